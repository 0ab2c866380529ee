from twisted.application.service import ServiceMaker

echo = ServiceMaker("echotw", "echotw.tap", "A byte-exact TCP/UDP echo server (RFC 862).", "echo")
