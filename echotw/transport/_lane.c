/*
 * echotw.transport._lane: the native echo lane (see echotw/transport/lane.py).
 *
 * A Lane serves an epoll set of admitted echo connections.  Either the set
 * is its own, whose descriptor is one reader in Twisted's reactor, and each
 * time it is readable serve() goes over every ready connection; or it is
 * the reactor's own set (Lane(epfd), echotw's reactor), and poll() is the
 * reactor's wait: one epoll_wait per turn, the lane's connections served
 * here, the reactor's other descriptors handed back for Python to dispatch.
 * Either way, each ready connection is served alike: recv into one shared scratch
 * buffer, send it straight back, and keep what the kernel did not take in a
 * buffer of that connection's own (at most one read's worth, LANE_MAX bytes).
 * While that buffer holds anything the connection is not read (only
 * EPOLLOUT is watched): that is the backpressure, and the bound on what one
 * connection holds.
 *
 * No parsing happens here, only moving bytes and counting them.  Whatever
 * needs Python (end of stream, an error, the session byte limit reached) is
 * reported by serve() as (fd, kind, errno, 0); the connection has then left the
 * epoll set, and its counts and unsent bytes wait for remove(fd), which
 * Python calls at once.  Python also calls remove(fd) before it closes a
 * descriptor itself, so a number the kernel reuses is never served by mistake.
 *
 * A connection added with LANE_OWNED is the lane's to close when it ends:
 * at the client's end of stream, everything echoed (the lane reads nothing
 * while it holds unsent bytes, so at an end of stream none are held), it
 * closes it (a FIN) and reports (fd, CLOSED, bytes received, 0); at an error
 * (a reset) it closes it and reports (fd, RESET, bytes received, bytes
 * unsent).  Either way it has forgotten it, so a short connection costs
 * Python nothing between its admission and that report.  Python holds no
 * socket object for such a descriptor while it is in the lane.  Every other
 * report is (fd, kind, errno, 0).
 *
 * A listening socket added with listen() is served too: each time it is
 * ready, the lane accepts up to LANE_ACCEPTS connections (non-blocking,
 * close-on-exec) and reports each as (fd, ACCEPTED, listening fd,
 * address), the address as Python's accept() gives it; Python decides
 * whether to admit it (add(fd, ..., OWNED)) or close it.
 * An accept that fails other than for want of a waiting connection (EMFILE,
 * ENOBUFS...) takes the listener out of the set and is reported as (its fd,
 * ACCEPT_FAILED, errno, 0): Python's own accept loop then meets the error
 * and knows how to back off.  The listening descriptor stays Python's.
 *
 * Nothing done goes unreported: each report is made before what it tells
 * (the close, the leaving), so one that fails (out of memory) leaves that
 * connection as it was, to be met again on the next pass, and serve()
 * returns what it had reported so far.  Only a failure before anything
 * was reported raises.  A connection whose echo lost bytes (no memory for
 * what the kernel did not take) echoes nothing more and leaves with ENOMEM;
 * its socket is set to reset when closed, so it cannot end cleanly.
 *
 * Every call is made with the GIL held: the system calls made are
 * non-blocking (epoll_wait with a zero timeout, recv and send on
 * non-blocking sockets), so holding it stalls no other thread for long, and
 * no other thread can touch the lane's tables while they change.  Only
 * poll()'s epoll_wait with a timeout releases it, as epoll.poll does; it
 * touches nothing of the lane's meanwhile.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef __linux__
#error "the native echo lane needs Linux's epoll"
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#define LANE_MAX 65536
#define LANE_EVENTS 256
/* Passes over the ready connections in one serve(), while each finds some:
 * a client answering at once is served again without a return to the
 * reactor's Python loop; bounded, so timers and new connections wait for
 * at most this many passes. */
#define LANE_PASSES 8
/* Connections accepted from one listener in one pass, at most: the rest
 * wait for the next pass (epoll is level-triggered). */
#define LANE_ACCEPTS 64

enum { ACTIVE = 0, LEFT = 1 };
enum {
    KIND_EOF = 1,
    KIND_ERROR = 2,
    KIND_LIMIT = 3,
    KIND_CLOSED = 4,
    KIND_RESET = 5,
    KIND_ACCEPTED = 6,
    KIND_ACCEPT_FAILED = 7
};
/* add()'s flags */
enum { LANE_NODELAY = 1, LANE_OWNED = 2 };

typedef struct {
    int fd;
    int state;
    unsigned long long received; /* bytes read and accepted for the echo */
    unsigned long long remaining; /* of the session byte limit, if limited */
    int limited;
    int owned;                    /* LANE_OWNED: closed here when it ends */
    int listening;                /* a listening socket (listen()), not a connection */
    int broken;                   /* errno: bytes were lost, it must leave (echo()) */
    char *buf;                    /* unsent echo, buf[off:len] */
    size_t off, len;
} Conn;

typedef struct {
    PyObject_HEAD
    int epfd;
    int shared; /* epfd is a duplicate of the reactor's own set's: poll() waits on it */
    Conn **table; /* indexed by descriptor */
    size_t size;
    Py_ssize_t count;
    char *scratch;
    PyObject *last_host; /* the text of the last IPv4 peer's address, */
    uint32_t last_ipv4;  /* which was this one (network order) */
} Lane;

static void
conn_free(Conn *c)
{
    free(c->buf);
    free(c);
}

static Conn *
lookup(Lane *self, long fd)
{
    if (fd < 0 || (size_t)fd >= self->size)
        return NULL;
    return self->table[fd];
}

/* The connection a Python argument names by its descriptor, or NULL with
 * KeyError (or the conversion's error) set. */
static Conn *
conn_arg(Lane *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    Conn *c = lookup(self, fd);
    if (c == NULL || c->listening) {
        PyErr_Format(PyExc_KeyError, "descriptor %ld is not in the lane", fd);
        return NULL;
    }
    return c;
}

static int
lane_check(Lane *self)
{
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the lane is closed");
        return -1;
    }
    return 0;
}

static PyObject *
Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"epfd", NULL};
    int shared = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|i", kwlist, &shared))
        return NULL;
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->epfd = -1;
    self->scratch = malloc(LANE_MAX);
    if (self->scratch == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (shared >= 0) {
        /* A descriptor of its own for the reactor's set: the set stays
         * while the lane holds it, and the number cannot be reused under it. */
        self->epfd = fcntl(shared, F_DUPFD_CLOEXEC, 0);
        self->shared = 1;
    } else {
        self->epfd = epoll_create1(EPOLL_CLOEXEC);
    }
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
lane_clear(Lane *self)
{
    for (size_t i = 0; i < self->size; i++) {
        Conn *c = self->table[i];
        if (c != NULL) {
            /* An owned connection's descriptor is the lane's alone. */
            if (c->owned)
                close(c->fd);
            conn_free(c);
            self->table[i] = NULL;
        }
    }
    self->count = 0;
}

static void
Lane_dealloc(Lane *self)
{
    /* The descriptors are Python's (their sockets'), but for owned ones:
     * only those, the lane's own memory and epoll descriptor are released. */
    lane_clear(self);
    free(self->table);
    free(self->scratch);
    Py_CLEAR(self->last_host);
    if (self->epfd >= 0)
        close(self->epfd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
watch(Lane *self, Conn *c, int op, uint32_t events)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    /* The descriptor, as Python's epoll.register gives it: in a shared set
     * an event is the lane's if its descriptor is an active one here. */
    ev.data.fd = c->fd;
    return epoll_ctl(self->epfd, op, c->fd, &ev);
}

/* Room in the table for descriptor fd; 0, or -1 with MemoryError set. */
static int
make_room(Lane *self, int fd);

/* Whether fd may join the lane (add() or listen()): the lane is open, fd is
 * a descriptor not in it yet, and the table has room for it; 0, or -1 with
 * an exception set. */
static int
can_join(Lane *self, int fd)
{
    if (lane_check(self) < 0)
        return -1;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "negative descriptor");
        return -1;
    }
    if (make_room(self, fd) < 0)
        return -1;
    if (self->table[fd] != NULL) {
        PyErr_Format(PyExc_ValueError, "descriptor %d is in the lane already", fd);
        return -1;
    }
    return 0;
}

static int
make_room(Lane *self, int fd)
{
    if ((size_t)fd < self->size)
        return 0;
    size_t size = self->size ? self->size : 64;
    while (size <= (size_t)fd)
        size *= 2;
    Conn **table = realloc(self->table, size * sizeof(Conn *));
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(table + self->size, 0, (size - self->size) * sizeof(Conn *));
    self->table = table;
    self->size = size;
    return 0;
}

static PyObject *
Lane_add(Lane *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* Called for every connection: its arguments read without a format. */
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "add(fd, limit=0, flags=0)");
        return NULL;
    }
    long fdArg = PyLong_AsLong(args[0]);
    if (fdArg == -1 && PyErr_Occurred())
        return NULL;
    if (fdArg > INT_MAX || fdArg < INT_MIN) {
        PyErr_SetString(PyExc_OverflowError, "descriptor out of range");
        return NULL;
    }
    int fd = (int)fdArg;
    unsigned long long limit = 0;
    if (nargs > 1) {
        limit = PyLong_AsUnsignedLongLong(args[1]);
        if (limit == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
    }
    long flags = 0;
    if (nargs > 2) {
        flags = PyLong_AsLong(args[2]);
        if (flags == -1 && PyErr_Occurred())
            return NULL;
    }
    if (can_join(self, fd) < 0)
        return NULL;
    if (flags & LANE_NODELAY) {
        int one = 1;
        /* Not TCP after all (a Unix socket): nothing to set. */
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    Conn *c = calloc(1, sizeof(Conn));
    if (c == NULL)
        return PyErr_NoMemory();
    c->fd = fd;
    c->limited = limit > 0;
    c->remaining = limit;
    c->owned = (flags & LANE_OWNED) != 0;
    if (watch(self, c, EPOLL_CTL_ADD, EPOLLIN) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        free(c);
        return NULL;
    }
    self->table[fd] = c;
    self->count++;
    Py_RETURN_NONE;
}

/* Append the item (stolen) to the report; 0, or -1 with an exception set. */
static int
report_item(PyObject **report, PyObject *item)
{
    if (item == NULL)
        return -1;
    if (*report == NULL) {
        *report = PyList_New(0);
        if (*report == NULL) {
            Py_DECREF(item);
            return -1;
        }
    }
    int r = PyList_Append(*report, item);
    Py_DECREF(item);
    return r;
}

/* A tuple of the n items (stolen, and released on failure; any may be NULL
 * after a failed conversion), built directly: Py_BuildValue's format parsing
 * costs more than the rest of a short connection's report; NULL with an
 * exception set. */
static PyObject *
tuple_of(Py_ssize_t n, PyObject **items)
{
    PyObject *tuple = PyTuple_New(n);
    int complete = tuple != NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        complete = complete && items[i] != NULL;
    if (!complete) {
        Py_XDECREF(tuple);
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(tuple, i, items[i]);
    return tuple;
}

/* The report entry (fd, kind, a, b), a and b stolen; NULL with an exception
 * set. */
static PyObject *
report_tuple(int fd, int kind, PyObject *a, PyObject *b)
{
    PyObject *items[4] = {PyLong_FromLong(fd), PyLong_FromLong(kind), a, b};
    return tuple_of(4, items);
}

/* Append (fd, kind, value, unsent) to the report; 0, or -1 with an
 * exception set. */
static int
report_append(PyObject **report, int fd, int kind, unsigned long long value, size_t unsent)
{
    return report_item(report, report_tuple(fd, kind, PyLong_FromUnsignedLongLong(value),
                                            PyLong_FromSize_t(unsent)));
}

static int end_owned(Lane *self, Conn *c, int kind, PyObject **report);

/* Leave the epoll set and tell Python why; 0, or -1 with an exception set.
 * An owned connection's end or error closes it instead (end_owned). */
static int
leave(Lane *self, Conn *c, int kind, int err, PyObject **report)
{
    if (c->owned && kind == KIND_EOF)
        return end_owned(self, c, KIND_CLOSED, report);
    if (c->owned && kind == KIND_ERROR)
        return end_owned(self, c, KIND_RESET, report);
    if (report_append(report, c->fd, kind, (unsigned long long)err, 0) < 0)
        return -1;
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    c->state = LEFT;
    return 0;
}

/* An owned connection's end: report it, close it, forget it. */
static int
end_owned(Lane *self, Conn *c, int kind, PyObject **report)
{
    int fd = c->fd;
    if (report_append(report, fd, kind, c->received, c->len - c->off) < 0)
        return -1;
    /* Out of the set first: a child forked meanwhile may still hold the
     * socket, and the set must not. */
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    self->table[fd] = NULL;
    self->count--;
    conn_free(c);
    return 0;
}

/* Send c's unsent bytes: 1 if all went, 0 if some wait, -errno on error. */
static int
flush(Conn *c)
{
    while (c->off < c->len) {
        ssize_t s = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (s < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -errno;
        }
        c->off += (size_t)s;
    }
    free(c->buf);
    c->buf = NULL;
    c->off = c->len = 0;
    return 1;
}

/* One read and its echo; 0, or -1 with an exception set. */
static int
echo(Lane *self, Conn *c, PyObject **report)
{
    if (c->limited && c->remaining == 0) /* its report failed earlier */
        return leave(self, c, KIND_LIMIT, 0, report);
    size_t want = LANE_MAX;
    if (c->limited && c->remaining < want)
        want = (size_t)c->remaining;
    ssize_t r;
    do {
        r = recv(c->fd, self->scratch, want, 0);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return leave(self, c, KIND_ERROR, errno, report);
    }
    if (r == 0)
        return leave(self, c, KIND_EOF, 0, report);
    c->received += (unsigned long long)r;
    if (c->limited)
        c->remaining -= (unsigned long long)r;
    size_t sent = 0;
    int err = 0;
    while (sent < (size_t)r) {
        ssize_t s = send(c->fd, self->scratch + sent, (size_t)r - sent, MSG_NOSIGNAL);
        if (s < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                err = errno;
            break;
        }
        sent += (size_t)s;
    }
    if (sent < (size_t)r) {
        /* Kept, so that what was received and not sent is counted as
         * unsent if the connection ends now. */
        c->buf = malloc((size_t)r - sent);
        if (c->buf == NULL) {
            /* Those bytes are lost: the connection must not end cleanly
             * (a reset, whoever closes it) nor echo anything more. */
            struct linger abort = {1, 0};
            (void)setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &abort, sizeof abort);
            c->received -= (unsigned long long)r - sent; /* never echoed */
            c->broken = ENOMEM;
            return leave(self, c, KIND_ERROR, ENOMEM, report);
        }
        memcpy(c->buf, self->scratch + sent, (size_t)r - sent);
        c->off = 0;
        c->len = (size_t)r - sent;
        if (err)
            return leave(self, c, KIND_ERROR, err, report);
        if (c->limited && c->remaining == 0)
            return leave(self, c, KIND_LIMIT, 0, report);
        if (watch(self, c, EPOLL_CTL_MOD, EPOLLOUT) < 0)
            return leave(self, c, KIND_ERROR, errno, report);
        return 0;
    }
    if (c->limited && c->remaining == 0)
        return leave(self, c, KIND_LIMIT, 0, report);
    return 0;
}

/* An IPv4 address in dotted decimal, as inet_ntop writes it (without its
 * formatted printing): out has room for 16 bytes; the length written. */
static int
format_ipv4(const unsigned char *a, char *out)
{
    int n = 0;
    for (int i = 0; i < 4; i++) {
        unsigned v = a[i];
        if (v >= 100)
            out[n++] = (char)('0' + v / 100);
        if (v >= 10)
            out[n++] = (char)('0' + v / 10 % 10);
        out[n++] = (char)('0' + v % 10);
        if (i < 3)
            out[n++] = '.';
    }
    return n;
}

/* The address accept() gave, as Python's socket.accept() gives it:
 * (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6, None
 * for any other family; NULL with an exception set. */
/* An IPv4 peer's address as text.  Most connections come from a few
 * hosts (a balancer's, a load client's): the last one's text is kept and
 * given again, so that Python hashes it once, not once per connection. */
static PyObject *
ipv4_host(Lane *self, const struct in_addr *addr)
{
    if (self->last_host != NULL && self->last_ipv4 == addr->s_addr) {
        Py_INCREF(self->last_host);
        return self->last_host;
    }
    char host[16];
    int n = format_ipv4((const unsigned char *)addr, host);
    PyObject *text = PyUnicode_FromStringAndSize(host, n);
    if (text == NULL)
        return NULL;
    Py_INCREF(text);
    Py_XSETREF(self->last_host, text);
    self->last_ipv4 = addr->s_addr;
    return text;
}

static PyObject *
peer_address(Lane *self, const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        PyObject *items[2] = {ipv4_host(self, &in->sin_addr),
                              PyLong_FromLong(ntohs(in->sin_port))};
        return tuple_of(2, items);
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        char host[INET6_ADDRSTRLEN];
        if (inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, ntohs(in6->sin6_port),
                             (unsigned int)ntohl(in6->sin6_flowinfo),
                             (unsigned int)in6->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* Accept what waits on listener c, up to LANE_ACCEPTS; 0, or -1 with an
 * exception set. */
static int
accept_some(Lane *self, Conn *c, PyObject **report)
{
    for (int i = 0; i < LANE_ACCEPTS; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept4(c->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            switch (errno) {
            case EAGAIN:
#if EWOULDBLOCK != EAGAIN
            case EWOULDBLOCK:
#endif
                return 0;
            case EINTR:
            case ECONNABORTED: /* gone before it was accepted */
            case EPROTO:
            case EPERM: /* a firewall's refusal */
            case ENETDOWN:
            case ENOPROTOOPT:
            case EHOSTDOWN:
            case ENONET:
            case EHOSTUNREACH:
            case EOPNOTSUPP:
            case ENETUNREACH:
                /* Network errors of the new connection, which Linux
                 * passes on through accept(): try the next one (still
                 * within this pass's bound). */
                continue;
            default:
                if (report_append(report, c->fd, KIND_ACCEPT_FAILED, (unsigned long long)errno, 0) < 0)
                    return -1;
                epoll_ctl(self->epfd, EPOLL_CTL_DEL, c->fd, NULL);
                c->state = LEFT;
                return 0;
            }
        }
        PyObject *peer = peer_address(self, &ss);
        if (report_item(report, report_tuple(fd, KIND_ACCEPTED, PyLong_FromLong(c->fd), peer)) < 0) {
            close(fd);
            return -1;
        }
    }
    return 0;
}

/* Append (fd, events) for a descriptor of the reactor's in a shared set,
 * as Python's epoll.poll gives it; 0, or -1 with an exception set. */
static int
report_other(PyObject **others, int fd, uint32_t events)
{
    PyObject *items[2] = {PyLong_FromLong(fd), PyLong_FromUnsignedLong(events)};
    return report_item(others, tuple_of(2, items));
}

/* Serve the lane's events among events[0:n]; with others, every other
 * event (the reactor's, in a shared set) is appended to it.  0, or -1 with
 * an exception set. */
static int
serve_events(Lane *self, struct epoll_event *events, int n, PyObject **report,
             PyObject **others)
{
    for (int i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        uint32_t ev = events[i].events;
        Conn *c = lookup(self, fd);
        if (c == NULL || c->state != ACTIVE) {
            if (others != NULL && report_other(others, fd, ev) < 0)
                return -1;
            continue;
        }
        if (c->listening) {
            if (accept_some(self, c, report) < 0)
                return -1;
            continue;
        }
        if (c->broken) { /* its report failed earlier */
            if (leave(self, c, KIND_ERROR, c->broken, report) < 0)
                return -1;
            continue;
        }
        if (c->len > c->off) {
            int f = flush(c);
            if (f < 0) {
                if (leave(self, c, KIND_ERROR, -f, report) < 0)
                    return -1;
                continue;
            }
            if (f == 0) {
                if (ev & (EPOLLERR | EPOLLHUP)) {
                    /* Nothing more will go: say why. */
                    int err = 0;
                    socklen_t len = sizeof err;
                    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err == 0)
                        err = EPIPE;
                    if (leave(self, c, KIND_ERROR, err, report) < 0)
                        return -1;
                }
                continue;
            }
            if (watch(self, c, EPOLL_CTL_MOD, EPOLLIN) < 0 &&
                leave(self, c, KIND_ERROR, errno, report) < 0)
                return -1;
            continue; /* read on the next pass: level-triggered */
        }
        if (echo(self, c, report) < 0)
            return -1;
    }
    return 0;
}

/* One pass over the ready connections of the lane's own set: how many
 * there were, or -1 with an exception set (or, with errno set and no
 * exception, epoll_wait failed). */
static int
serve_once(Lane *self, struct epoll_event *events, PyObject **report)
{
    int n;
    do {
        n = epoll_wait(self->epfd, events, LANE_EVENTS, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -1;
    if (serve_events(self, events, n, report, NULL) < 0)
        return -1;
    return n;
}

static PyObject *
Lane_serve(Lane *self, PyObject *Py_UNUSED(ignored))
{
    struct epoll_event events[LANE_EVENTS];
    PyObject *report = NULL;
    if (lane_check(self) < 0)
        return NULL;
    if (self->shared) {
        PyErr_SetString(PyExc_ValueError, "a lane in the reactor's set is served by poll()");
        return NULL;
    }
    for (int pass = 0; pass < LANE_PASSES; pass++) {
        int n = serve_once(self, events, &report);
        if (n < 0 && PyErr_Occurred()) {
            if (report == NULL || PyList_GET_SIZE(report) == 0) {
                Py_XDECREF(report);
                return NULL;
            }
            /* What was done is reported; what failed was not done (or was
             * closed: a connection just accepted), and is met again on the
             * next call (epoll is level-triggered). */
            PyErr_Clear();
            return report;
        }
        if (n < 0 && pass == 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (n <= 0)
            break; /* nothing ready; or epoll_wait failed, to be met again */
    }
    if (report == NULL)
        Py_RETURN_NONE;
    return report;
}

/* poll()'s timeout in milliseconds, as Python's epoll.poll reads it: None
 * or a negative number waits for ever, a fraction of a millisecond is
 * rounded up, NaN is refused; -2 with an exception set. */
static int
timeout_ms(PyObject *arg)
{
    if (arg == Py_None)
        return -1;
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred())
        return -2;
    if (t != t) {
        PyErr_SetString(PyExc_ValueError, "timeout is not a number");
        return -2;
    }
    if (t < 0)
        return -1;
    double ms = t * 1e3;
    if (ms >= (double)INT_MAX)
        return INT_MAX;
    int whole = (int)ms;
    return whole < ms ? whole + 1 : whole;
}

static PyObject *
Lane_poll(Lane *self, PyObject *arg)
{
    if (lane_check(self) < 0)
        return NULL;
    if (!self->shared) {
        PyErr_SetString(PyExc_ValueError, "a lane with a set of its own is served by serve()");
        return NULL;
    }
    int ms = timeout_ms(arg);
    if (ms == -2)
        return NULL;
    /* Made before the wait: once events are served, a result that could
     * not be made would lose their reports. */
    PyObject *result = PyTuple_New(2);
    if (result == NULL)
        return NULL;
    struct epoll_event events[LANE_EVENTS];
    int n, err = 0;
    if (ms == 0) {
        n = epoll_wait(self->epfd, events, LANE_EVENTS, 0);
        err = errno;
    } else {
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(self->epfd, events, LANE_EVENTS, ms);
        err = errno;
        Py_END_ALLOW_THREADS
    }
    if (n < 0) {
        if (err != EINTR) {
            Py_DECREF(result);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        /* A signal: its Python handler runs now, as after epoll.poll. */
        if (PyErr_CheckSignals() < 0) {
            Py_DECREF(result);
            return NULL;
        }
        n = 0;
    }
    PyObject *report = NULL, *others = NULL;
    if (serve_events(self, events, n, &report, &others) < 0) {
        if (report == NULL && others == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        /* What was done is reported; the rest is met again at the next
         * wait (the set is level-triggered). */
        PyErr_Clear();
    }
    PyTuple_SET_ITEM(result, 0, others != NULL ? others : Py_NewRef(Py_None));
    PyTuple_SET_ITEM(result, 1, report != NULL ? report : Py_NewRef(Py_None));
    return result;
}

static PyObject *
Lane_listen(Lane *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    /* A listener whose accept failed stays in the table, out of the set,
     * until Python unlistens it: only then may it listen again. */
    if (can_join(self, fd) < 0)
        return NULL;
    Conn *c = calloc(1, sizeof(Conn));
    if (c == NULL)
        return PyErr_NoMemory();
    c->fd = fd;
    c->listening = 1;
    if (watch(self, c, EPOLL_CTL_ADD, EPOLLIN) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        free(c);
        return NULL;
    }
    self->table[fd] = c;
    Py_RETURN_NONE;
}

static PyObject *
Lane_unlisten(Lane *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    Conn *c = lookup(self, fd);
    if (c == NULL || !c->listening) {
        PyErr_Format(PyExc_KeyError, "descriptor %ld is not listening in the lane", fd);
        return NULL;
    }
    if (c->state == ACTIVE && self->epfd >= 0)
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    self->table[fd] = NULL;
    conn_free(c);
    Py_RETURN_NONE;
}

static PyObject *
Lane_remove(Lane *self, PyObject *arg)
{
    Conn *c = conn_arg(self, arg);
    if (c == NULL)
        return NULL;
    /* The result first: if it cannot be made, the connection stays
     * served, in the set and the table, as if never asked. */
    PyObject *unsent = PyBytes_FromStringAndSize(c->buf + c->off, (Py_ssize_t)(c->len - c->off));
    if (unsent == NULL)
        return NULL;
    PyObject *result = Py_BuildValue("(KN)", c->received, unsent);
    if (result == NULL)
        return NULL;
    if (c->state == ACTIVE && self->epfd >= 0)
        /* ENOENT or EBADF if Python closed it first: nothing to undo. */
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    self->table[c->fd] = NULL;
    self->count--;
    conn_free(c);
    return result;
}

static PyObject *
Lane_received(Lane *self, PyObject *arg)
{
    Conn *c = conn_arg(self, arg);
    if (c == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(c->received);
}

static PyObject *
Lane_pending(Lane *self, PyObject *arg)
{
    Conn *c = conn_arg(self, arg);
    if (c == NULL)
        return NULL;
    return PyLong_FromSize_t(c->len - c->off);
}

static PyObject *
Lane_fileno(Lane *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(self->epfd);
}

static PyObject *
Lane_close(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (self->shared && self->epfd >= 0) {
        /* The set goes on serving the reactor: leave it. */
        for (size_t i = 0; i < self->size; i++) {
            Conn *c = self->table[i];
            if (c != NULL && c->state == ACTIVE)
                epoll_ctl(self->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        }
    }
    lane_clear(self);
    if (self->epfd >= 0)
        close(self->epfd);
    self->epfd = -1;
    Py_RETURN_NONE;
}

static Py_ssize_t
Lane_len(Lane *self)
{
    return self->count;
}

static PyMethodDef Lane_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Lane_add, METH_FASTCALL,
     "add(fd, limit=0, flags=0): serve this connected socket; echo at most "
     "limit bytes (0: no limit).  flags: NODELAY (set TCP_NODELAY), OWNED (the "
     "lane closes it when it ends)."},
    {"serve", (PyCFunction)Lane_serve, METH_NOARGS,
     "Serve every ready connection once; a list of (fd, kind, value, unsent) "
     "for those that left the lane (value: errno; for CLOSED and RESET, the bytes "
     "received, and unsent the bytes not sent), or None."},
    {"poll", (PyCFunction)Lane_poll, METH_O,
     "poll(timeout): for a lane in the reactor's epoll set (Lane(epfd)), wait "
     "up to timeout seconds (None: for ever), serve the lane's ready "
     "connections, and return (events, report): the reactor's other ready "
     "descriptors as [(fd, events)] (as epoll.poll gives them) or None, and "
     "serve()'s report."},
    {"listen", (PyCFunction)Lane_listen, METH_VARARGS,
     "listen(fd): accept the connections of this listening, non-blocking socket "
     "(each reported as ACCEPTED)."},
    {"unlisten", (PyCFunction)Lane_unlisten, METH_O,
     "unlisten(fd): stop accepting on this listening socket (which stays open)."},
    {"remove", (PyCFunction)Lane_remove, METH_O,
     "remove(fd): forget a connection; (bytes received, unsent bytes)."},
    {"received", (PyCFunction)Lane_received, METH_O,
     "received(fd): bytes read from it and accepted for the echo."},
    {"pending", (PyCFunction)Lane_pending, METH_O,
     "pending(fd): bytes received and not yet sent back."},
    {"fileno", (PyCFunction)Lane_fileno, METH_NOARGS, "The epoll descriptor."},
    {"close", (PyCFunction)Lane_close, METH_NOARGS,
     "Forget every connection and close the epoll descriptor."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Lane_as_sequence = {
    .sq_length = (lenfunc)Lane_len,
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "echotw.transport._lane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_as_sequence = &Lane_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An epoll set of echo connections served without the interpreter.",
    .tp_methods = Lane_methods,
    .tp_new = Lane_new,
};

static struct PyModuleDef lanemodule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "echotw.transport._lane",
    .m_doc = "The native echo lane: moves bytes, parses nothing.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__lane(void)
{
    if (PyType_Ready(&LaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&lanemodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0
        || PyModule_AddIntConstant(m, "EOF", KIND_EOF) < 0
        || PyModule_AddIntConstant(m, "ERROR", KIND_ERROR) < 0
        || PyModule_AddIntConstant(m, "LIMIT", KIND_LIMIT) < 0
        || PyModule_AddIntConstant(m, "CLOSED", KIND_CLOSED) < 0
        || PyModule_AddIntConstant(m, "RESET", KIND_RESET) < 0
        || PyModule_AddIntConstant(m, "ACCEPTED", KIND_ACCEPTED) < 0
        || PyModule_AddIntConstant(m, "ACCEPT_FAILED", KIND_ACCEPT_FAILED) < 0
        || PyModule_AddIntConstant(m, "NODELAY", LANE_NODELAY) < 0
        || PyModule_AddIntConstant(m, "OWNED", LANE_OWNED) < 0
        || PyModule_AddIntConstant(m, "MAX_PENDING", LANE_MAX) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
