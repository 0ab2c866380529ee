/*
 * echotw.transport._lane: the native echo lane (see echotw/transport/lane.py).
 *
 * A Lane owns an epoll set of admitted echo connections.  Its own epoll
 * descriptor is one reader in Twisted's reactor; each time it is readable,
 * serve() goes over every ready connection: recv into one shared scratch
 * buffer, send it straight back, and keep what the kernel did not take in a
 * buffer of that connection's own (at most one read's worth, LANE_MAX bytes).
 * While that buffer holds anything the connection is not read (only
 * EPOLLOUT is watched): that is the backpressure, and the bound on what one
 * connection holds.
 *
 * No parsing happens here, only moving bytes and counting them.  Whatever
 * needs Python (end of stream, an error, the session byte limit reached) is
 * reported by serve() as (fd, kind, errno); the connection has then left the
 * epoll set, and its counts and unsent bytes wait for remove(fd), which
 * Python calls at once.  Python also calls remove(fd) before it closes a
 * descriptor itself, so a number the kernel reuses is never served by mistake.
 *
 * Every call is made with the GIL held: the system calls made are
 * non-blocking (epoll_wait with a zero timeout, recv and send on
 * non-blocking sockets), so holding it stalls no other thread for long, and
 * no other thread can touch the lane's tables while they change.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef __linux__
#error "the native echo lane needs Linux's epoll"
#endif

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define LANE_MAX 65536
#define LANE_EVENTS 256
/* Passes over the ready connections in one serve(), while each finds some:
 * a client answering at once is served again without a return to the
 * reactor's Python loop; bounded, so timers and new connections wait for
 * at most this many passes. */
#define LANE_PASSES 8

enum { ACTIVE = 0, LEFT = 1 };
enum { KIND_EOF = 1, KIND_ERROR = 2, KIND_LIMIT = 3 };

typedef struct {
    int fd;
    int state;
    unsigned long long received; /* bytes read and accepted for the echo */
    unsigned long long remaining; /* of the session byte limit, if limited */
    int limited;
    char *buf;                    /* unsent echo, buf[off:len] */
    size_t off, len;
} Conn;

typedef struct {
    PyObject_HEAD
    int epfd;
    Conn **table; /* indexed by descriptor */
    size_t size;
    Py_ssize_t count;
    char *scratch;
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
    if (c == NULL)
        PyErr_Format(PyExc_KeyError, "descriptor %ld is not in the lane", fd);
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
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist))
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
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
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
        if (self->table[i] != NULL) {
            conn_free(self->table[i]);
            self->table[i] = NULL;
        }
    }
    self->count = 0;
}

static void
Lane_dealloc(Lane *self)
{
    /* The descriptors are Python's (their sockets'): only the lane's own
     * memory and epoll descriptor are released here. */
    lane_clear(self);
    free(self->table);
    free(self->scratch);
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
    ev.data.ptr = c;
    return epoll_ctl(self->epfd, op, c->fd, &ev);
}

static PyObject *
Lane_add(Lane *self, PyObject *args)
{
    int fd;
    unsigned long long limit = 0;
    if (!PyArg_ParseTuple(args, "i|K", &fd, &limit))
        return NULL;
    if (lane_check(self) < 0)
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "negative descriptor");
        return NULL;
    }
    if ((size_t)fd >= self->size) {
        size_t size = self->size ? self->size : 64;
        while (size <= (size_t)fd)
            size *= 2;
        Conn **table = realloc(self->table, size * sizeof(Conn *));
        if (table == NULL)
            return PyErr_NoMemory();
        memset(table + self->size, 0, (size - self->size) * sizeof(Conn *));
        self->table = table;
        self->size = size;
    }
    if (self->table[fd] != NULL) {
        PyErr_Format(PyExc_ValueError, "descriptor %d is in the lane already", fd);
        return NULL;
    }
    Conn *c = calloc(1, sizeof(Conn));
    if (c == NULL)
        return PyErr_NoMemory();
    c->fd = fd;
    c->limited = limit > 0;
    c->remaining = limit;
    if (watch(self, c, EPOLL_CTL_ADD, EPOLLIN) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        free(c);
        return NULL;
    }
    self->table[fd] = c;
    self->count++;
    Py_RETURN_NONE;
}

/* Leave the epoll set and tell Python why; 0, or -1 with an exception set. */
static int
leave(Lane *self, Conn *c, int kind, int err, PyObject **report)
{
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    c->state = LEFT;
    if (*report == NULL) {
        *report = PyList_New(0);
        if (*report == NULL)
            return -1;
    }
    PyObject *item = Py_BuildValue("(iii)", c->fd, kind, err);
    if (item == NULL)
        return -1;
    int r = PyList_Append(*report, item);
    Py_DECREF(item);
    return r;
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
            PyErr_NoMemory();
            return -1;
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

/* One pass over the ready connections: how many there were, or -1 with an
 * exception set (or, with errno set and no exception, epoll_wait failed). */
static int
serve_once(Lane *self, struct epoll_event *events, PyObject **report)
{
    int n;
    do {
        n = epoll_wait(self->epfd, events, LANE_EVENTS, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -1;
    for (int i = 0; i < n; i++) {
        Conn *c = events[i].data.ptr;
        uint32_t ev = events[i].events;
        if (c->state != ACTIVE)
            continue;
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
    return n;
}

static PyObject *
Lane_serve(Lane *self, PyObject *Py_UNUSED(ignored))
{
    struct epoll_event events[LANE_EVENTS];
    PyObject *report = NULL;
    if (lane_check(self) < 0)
        return NULL;
    for (int pass = 0; pass < LANE_PASSES; pass++) {
        int n = serve_once(self, events, &report);
        if (n < 0 && PyErr_Occurred()) {
            Py_XDECREF(report);
            return NULL;
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

static PyObject *
Lane_remove(Lane *self, PyObject *arg)
{
    Conn *c = conn_arg(self, arg);
    if (c == NULL)
        return NULL;
    if (c->state == ACTIVE && self->epfd >= 0)
        /* ENOENT or EBADF if Python closed it first: nothing to undo. */
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    PyObject *unsent = PyBytes_FromStringAndSize(c->buf + c->off, (Py_ssize_t)(c->len - c->off));
    if (unsent == NULL)
        return NULL;
    PyObject *result = Py_BuildValue("(KN)", c->received, unsent);
    if (result == NULL)
        return NULL;
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
    lane_clear(self);
    if (self->epfd >= 0) {
        close(self->epfd);
        self->epfd = -1;
    }
    Py_RETURN_NONE;
}

static Py_ssize_t
Lane_len(Lane *self)
{
    return self->count;
}

static PyMethodDef Lane_methods[] = {
    {"add", (PyCFunction)Lane_add, METH_VARARGS,
     "add(fd, limit=0): serve this connected, non-blocking socket; echo at most "
     "limit bytes (0: no limit)."},
    {"serve", (PyCFunction)Lane_serve, METH_NOARGS,
     "Serve every ready connection once; a list of (fd, kind, errno) for those "
     "that left the lane, or None."},
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
        || PyModule_AddIntConstant(m, "MAX_PENDING", LANE_MAX) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
