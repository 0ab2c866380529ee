/*
 * epoll_echo: the smallest honest TCP echo server, the floor the other
 * servers are measured against (bench/instructions.py: user-space
 * instructions per unit of work; what is left is mostly the system calls'
 * own wrappers).
 *
 *   epoll_echo PORT        (listens on 127.0.0.1 only)
 *
 * One thread, one epoll set, level-triggered, non-blocking sockets.  Each
 * connection has one buffer of BUF bytes: read into it, write it back; what
 * the peer does not take yet stays there, the connection stops being read
 * (EPOLLIN off, EPOLLOUT on) until the buffer has drained, so a client that
 * does not read holds at most BUF bytes here, as echotw does.  End of stream
 * is only seen once what was pending has been written back, and closes the
 * connection; so does an error.  SIGPIPE is ignored; EINTR and EAGAIN are retried
 * or waited out.  SIGTERM and SIGINT end it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF (64u << 10)
#define MAX_EVENTS 256

struct conn {
    int fd;
    size_t off;   /* first byte of buf not yet written back */
    size_t len;   /* bytes in buf */
    unsigned char buf[BUF];
};

static int ep;

static void set_events(struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void finish(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* write back what is pending; 0 when drained, 1 when the socket is full, -1 on error */
static int flush(struct conn *c) {
    while (c->off < c->len) {
        ssize_t w = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
            return -1;
        }
        c->off += (size_t)w;
    }
    c->off = c->len = 0;
    return 0;
}

static void on_readable(struct conn *c) {
    for (;;) {
        ssize_t r = recv(c->fd, c->buf, BUF, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (r <= 0) { /* end of stream (nothing pending: buf was empty) or an error */
            finish(c);
            return;
        }
        c->len = (size_t)r;
        int left = flush(c);
        if (left < 0) { finish(c); return; }
        if (left > 0) { set_events(c, EPOLLOUT); return; } /* stop reading until drained */
        if ((size_t)r < BUF) return; /* level-triggered: epoll says when there is more */
    }
}

static void on_writable(struct conn *c) {
    int left = flush(c);
    if (left < 0) finish(c);
    else if (left == 0) set_events(c, EPOLLIN); /* drained: read again (an end of stream too) */
}

static void on_accept(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return; /* EAGAIN, or out of descriptors: try again on the next wake-up */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = malloc(sizeof *c);
        if (!c) { close(fd); continue; }
        c->fd = fd;
        c->off = c->len = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) { close(fd); free(c); }
    }
}

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    int port = argc == 2 ? atoi(argv[1]) : 0;
    if (port < 1 || port > 65535) {
        fprintf(stderr, "usage: epoll_echo PORT   (listens on 127.0.0.1)\n");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        perror("epoll_echo: listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) < 0) {
        perror("epoll_echo: epoll");
        return 1;
    }
    struct epoll_event evs[MAX_EVENTS];
    while (!stop) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) { on_accept(lfd); continue; }
            if (evs[i].events & EPOLLOUT) on_writable(c);
            else on_readable(c);
        }
    }
    return 0;
}
