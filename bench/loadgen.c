/*
 * loadgen: the echotw benchmark's load client (see bench/README.md).
 *
 * One thread, non-blocking sockets, one epoll set.  A Python client would be
 * slower than most of the servers it measures and squeeze every ratio towards
 * 1, so the client is C and gets a CPU of its own (run.py pins it).
 *
 *   loadgen --mode pingpong|stream|churn|hold --port P [--host 127.0.0.1]
 *           [--conns N] [--size BYTES] [--seconds S] [--warmup S]
 *           [--window BYTES] [--setup-timeout S] [--block] [--count N] [--gate]
 *
 * Every connection carries one byte stream cut from a fixed pseudo-random
 * table, starting at an offset derived from the connection's number: byte i
 * of connection c is table[(start(c) + i) % TABLE].  Whatever comes back is
 * compared with what that position should hold, so reordering, loss,
 * duplication and corruption are all caught; a mismatch prints the position
 * and exits 2.
 *
 * pingpong: N connections, each with one SIZE-byte message in flight; the
 *           next message is sent when the last byte of the echo is back.
 * stream:   N connections writing SIZE-byte chunks while fewer than WINDOW
 *           bytes are unanswered (bounded in-flight data per connection).
 * churn:    N cycles in flight, each: connect, send SIZE bytes, read them
 *           back, close with SO_LINGER {1,0} (an RST: no TIME_WAIT, so the
 *           ephemeral ports never run out), start again at once.
 * hold:     open N connections, one verified SIZE-byte echo each, print
 *           {"event":"held",...}, then wait for a line or EOF on stdin (or
 *           SECONDS) so the caller can read the server's memory; then RST.
 *
 * pingpong and stream first open all connections (at most SETUP_PARALLEL
 * connecting at once) and do one verified echo on each, so connection setup
 * is never measured; then WARMUP seconds unmeasured, SECONDS measured, then
 * the bytes in flight are drained (and verified) before the sockets close.
 *
 * By default epoll_wait is polled with timeout 0: on the 2-vCPU VM this was
 * written on, a cross-CPU wake-up costs tens of microseconds, and a client
 * that sleeps would make every server look alike.  --block sleeps instead.
 * The JSON line reports client_idle_pct, the share of the measured time spent
 * in empty polls: near 0 means the client, not the server, set the pace.
 *
 * --count N bounds the work instead of the clock: N round trips (pingpong),
 * N bytes echoed (stream) or N completed cycles (churn), counted from the
 * first byte after setup, with no warm-up; SECONDS is then only a limit (a
 * run cut short by it reports "fatal").  The JSON line's ops and bytes are
 * then all the work done after setup, drain included.  --gate (with
 * --count) hands the timing to the caller: after setup loadgen prints
 * {"event":"ready"} and waits for a line on stdin before the first byte,
 * and after its result line it waits for another before closing anything,
 * so a caller can measure the server over exactly the counted work
 * (bench/instructions.py switches callgrind on and off there).
 *
 * Only 127.x.x.x is accepted as HOST, and an alarm ends the process at
 * setup-timeout + warmup + seconds + GRACE_S whatever happens.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TABLE (1u << 20)          /* pattern table length (bytes) */
#define MAX_SIZE (256u << 10)     /* largest message / chunk; the table has this much slack */
#define READ_BUF (256u << 10)
#define SETUP_PARALLEL 32         /* connections being opened at once */
#define DRAIN_S 2.0               /* at most this long to collect bytes in flight at the end */
#define CYCLE_TIMEOUT_S 3.0       /* churn: a cycle older than this is abandoned */
#define GRACE_S 6                 /* added to the alarm */
#define GATE_S 60                 /* --gate: longest wait for each line on stdin */
#define MAX_EVENTS 1024
#define MAX_SLOTS 3600            /* per-second progress counters */
#define SUB 64                    /* log-linear histogram: sub-buckets per power of two */
#define NBUCKETS (2 * SUB + 40 * SUB)

enum mode { PINGPONG, STREAM, CHURN, HOLD };
enum cstate { FREE, CONNECTING, CHECKING, LOADED, CLOSED };

struct conn {
    int fd;
    enum cstate state;
    int want_out;        /* EPOLLOUT is registered */
    uint32_t start;      /* table offset of stream byte 0 */
    uint64_t sent;       /* stream bytes written */
    uint64_t got;        /* stream bytes read back and verified */
    uint64_t goal;       /* pingpong/checking/churn: send up to here, then wait for the echo */
    uint64_t t_msg;      /* when the current message (or cycle) started, ns */
    uint32_t serial;     /* how many streams this slot has started (churn) */
};

static struct {
    enum mode mode;
    const char *mode_name;
    struct sockaddr_in addr;
    int conns, block, gate;
    uint64_t count;
    size_t size, window;
    double seconds, warmup, setup_timeout;
} cfg = {.conns = 1, .size = 64, .window = 256u << 10, .seconds = 5, .warmup = 1,
         .setup_timeout = 10};

static struct conn *conn;
static unsigned char *table, *rbuf;
static int ep;

/* run state */
static int measuring, stopping, opened, connecting, checked, lost, held, peak;
static uint64_t t_measure, t_stop, t_last_progress, idle_ns;
static uint64_t ops, bytes, errors, timeouts, mismatches;
static uint64_t started, budget; /* --count: messages/cycles begun, stream bytes not yet sent */
static uint64_t per_second[MAX_SLOTS];
static uint64_t hist[NBUCKETS], hist_n, lat_max;
static double cpu_at_measure, setup_s, held_s;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double self_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* splitmix64: a fixed seed, so a run is reproducible and a mismatch can be replayed */
static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void fill_table(void) {
    table = malloc(TABLE + MAX_SIZE);
    rbuf = malloc(READ_BUF);
    if (!table || !rbuf) { perror("malloc"); exit(1); }
    for (uint32_t i = 0; i < TABLE; i += 8) {
        uint64_t v = mix(i);
        memcpy(table + i, &v, 8);
    }
    memcpy(table + TABLE, table, MAX_SIZE); /* a write of <= MAX_SIZE never wraps */
}

/* --- latency histogram: exact below 2*SUB ns-units, ~1.5 % wide buckets above --- */

static int bucket_of(uint64_t v) {
    if (v < 2 * SUB) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 6; /* (v >> shift) is in [SUB, 2*SUB) */
    int idx = 2 * SUB + (shift - 1) * SUB + (int)((v >> shift) - SUB);
    return idx < NBUCKETS ? idx : NBUCKETS - 1;
}

static uint64_t bucket_floor(int idx) {
    if (idx < 2 * SUB) return (uint64_t)idx;
    int shift = (idx - 2 * SUB) / SUB + 1;
    return ((uint64_t)((idx - 2 * SUB) % SUB + SUB)) << shift;
}

static void record_latency(uint64_t ns) {
    uint64_t us = ns / 1000;
    hist[bucket_of(us)]++;
    hist_n++;
    if (ns > lat_max) lat_max = ns;
}

static uint64_t percentile_us(double q) {
    uint64_t want = (uint64_t)(q * (double)hist_n + 0.5), seen = 0;
    if (!hist_n) return 0;
    if (want < 1) want = 1;
    for (int i = 0; i < NBUCKETS; i++)
        if ((seen += hist[i]) >= want) return bucket_floor(i);
    return bucket_floor(NBUCKETS - 1);
}

/* --- progress accounting --- */

static void count_op(uint64_t t, uint64_t latency_ns) {
    t_last_progress = t;
    if (!measuring || stopping) return;
    ops++;
    record_latency(latency_ns);
    uint64_t slot = (t - t_measure) / 1000000000ull;
    if (slot < MAX_SLOTS) per_second[slot]++;
}

static void count_bytes(uint64_t t, size_t n) {
    t_last_progress = t;
    if (!measuring || stopping) return;
    bytes += n;
    if (cfg.mode == STREAM) {
        uint64_t slot = (t - t_measure) / 1000000000ull;
        if (slot < MAX_SLOTS) per_second[slot] += n;
    }
}

/* --- output --- */

static double measured_s(void) {
    if (!measuring) return 0;
    return ((stopping ? t_stop : now_ns()) - t_measure) / 1e9;
}

static void print_per_second(double secs) {
    int n = (int)secs;
    if (n > MAX_SLOTS) n = MAX_SLOTS;
    printf(",\"per_s\":[");
    for (int i = 0; i < n; i++)
        printf(cfg.mode == STREAM ? "%s%.1f" : "%s%.0f", i ? "," : "",
               cfg.mode == STREAM ? per_second[i] / 1e6 : (double)per_second[i]);
    printf("]");
}

static void report(const char *fatal) {
    double secs = measured_s();
    printf("{\"mode\":\"%s\",\"conns\":%d,\"size\":%zu", cfg.mode_name, cfg.conns, cfg.size);
    if (cfg.mode == HOLD) {
        printf(",\"conns_ready\":%d,\"peak_ready\":%d,\"lost\":%d,\"setup_s\":%.3f,"
               "\"held_s\":%.3f", held, peak, lost, setup_s, held_s);
    } else {
        if (cfg.mode != CHURN) printf(",\"conns_ready\":%d,\"setup_s\":%.3f", checked, setup_s);
        double rate = secs > 0 ? ops / secs : 0;
        printf(",\"seconds\":%.3f,\"ops\":%llu,\"ops_per_s\":%.1f,\"mb_per_s\":%.2f", secs,
               (unsigned long long)ops, cfg.mode == STREAM ? 0.0 : rate,
               secs > 0 ? bytes / secs / 1e6 : 0.0);
        if (cfg.mode != STREAM)
            printf(",\"p50_us\":%llu,\"p99_us\":%llu,\"max_us\":%llu",
                   (unsigned long long)percentile_us(0.50), (unsigned long long)percentile_us(0.99),
                   (unsigned long long)(lat_max / 1000));
        printf(",\"timeouts\":%llu,\"last_progress_s\":%.3f", (unsigned long long)timeouts,
               t_last_progress > t_measure && measuring ? (t_last_progress - t_measure) / 1e9 : 0.0);
        print_per_second(secs);
        printf(",\"client\":\"%s\",\"client_idle_pct\":%.1f,\"client_cpu_pct\":%.1f",
               cfg.block ? "block" : "spin", secs > 0 ? idle_ns / 1e7 / secs : 0.0,
               secs > 0 ? 100.0 * (self_cpu_s() - cpu_at_measure) / secs : 0.0);
    }
    printf(",\"errors\":%llu,\"mismatches\":%llu", (unsigned long long)errors,
           (unsigned long long)mismatches);
    if (cfg.count)
        printf(",\"count\":%llu,\"bytes\":%llu", (unsigned long long)cfg.count,
               (unsigned long long)bytes);
    if (fatal) printf(",\"fatal\":\"%s\"", fatal);
    printf("}\n");
    fflush(stdout);
}

static void on_alarm(int sig) {
    static const char line[] = "{\"fatal\":\"loadgen deadline\"}\n";
    (void)sig;
    if (write(1, line, sizeof line - 1) < 0) {}
    _exit(3);
}

/* --- connections --- */

static void watch(struct conn *c, int out) {
    if (c->want_out == out) return;
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

static void drop(struct conn *c, int is_error) {
    if (c->fd >= 0) close(c->fd);
    if (c->state == CONNECTING) connecting--;
    if (c->state == LOADED || c->state == CHECKING) opened--;
    if (c->state == LOADED && cfg.mode != CHURN) checked--;
    c->fd = -1;
    c->state = CLOSED;
    errors += (uint64_t)is_error;
}

static void open_conn(struct conn *c) {
    int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->t_msg = now_ns();
    c->sent = c->got = c->goal = 0;
    c->start = (uint32_t)(mix(((uint64_t)(c - conn) << 32) | c->serial++) % TABLE);
    if (fd < 0) { c->state = CLOSED; errors++; return; }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (cfg.mode == CHURN) {
        struct linger rst = {.l_onoff = 1, .l_linger = 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof rst);
    }
    c->fd = fd;
    c->state = CONNECTING;
    c->want_out = 1;
    connecting++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&cfg.addr, sizeof cfg.addr) < 0 && errno != EINPROGRESS)
        drop(c, 1);
}

/* write from the pattern up to `limit` stream bytes; returns -1 if the socket failed */
static int pump(struct conn *c, uint64_t limit) {
    while (c->sent < limit) {
        size_t n = limit - c->sent;
        if (n > cfg.size) n = cfg.size;
        int budgeted = cfg.count && cfg.mode == STREAM && c->state == LOADED;
        if (budgeted && n > budget) n = (size_t)budget;
        if (n == 0) break;
        ssize_t w = write(c->fd, table + (c->start + c->sent) % TABLE, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) { watch(c, 1); return 0; }
            return -1;
        }
        c->sent += (uint64_t)w;
        if (budgeted) budget -= (uint64_t)w;
    }
    watch(c, 0);
    return 0;
}

/* how far this connection may write now */
static uint64_t send_limit(struct conn *c) {
    if (cfg.mode == STREAM && c->state == LOADED)
        return stopping ? c->sent : c->got + cfg.window;
    return c->goal;
}

static void next_message(struct conn *c, uint64_t t) {
    c->goal = c->got + cfg.size;
    c->t_msg = t;
}

static void on_connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    connecting--;
    if (err) { c->state = CLOSED; close(c->fd); c->fd = -1; errors++; return; }
    c->state = CHECKING;
    opened++;
    c->want_out = -1;
    c->goal = cfg.size; /* the check echo (churn: the cycle's message) */
    if (pump(c, c->goal) < 0) drop(c, 1);
}

/* the echo of c->goal bytes is complete */
static void on_echoed(struct conn *c, uint64_t t) {
    if (cfg.mode == CHURN) {
        close(c->fd); /* RST: SO_LINGER {1,0} */
        c->fd = -1;
        c->state = FREE;
        opened--;
        count_op(t, t - c->t_msg);
        return;
    }
    if (c->state == CHECKING) {
        c->state = LOADED;
        if (++checked > peak) peak = checked;
        return;
    }
    count_op(t, t - c->t_msg);
    if (cfg.count && started >= cfg.count) return;
    started++;
    if (!stopping && cfg.mode == PINGPONG) {
        next_message(c, t);
        if (pump(c, c->goal) < 0) drop(c, 1);
    }
}

static void fail_mismatch(struct conn *c, uint64_t pos, int want, int got) {
    mismatches++;
    fprintf(stderr, "MISMATCH: connection %ld, stream byte %llu: expected 0x%02x, got 0x%02x\n",
            (long)(c - conn), (unsigned long long)pos, want, got);
    if (measuring && !stopping) { stopping = 1; t_stop = now_ns(); }
    report("byte mismatch");
    exit(2);
}

/* compare n received bytes with the pattern at stream position c->got */
static void verify(struct conn *c, const unsigned char *buf, size_t n) {
    if (c->got + n > c->sent) fail_mismatch(c, c->sent, -1, buf[c->sent - c->got]);
    size_t done = 0;
    while (done < n) {
        uint32_t at = (uint32_t)((c->start + c->got + done) % TABLE);
        size_t run = TABLE - at < n - done ? TABLE - at : n - done;
        if (memcmp(buf + done, table + at, run) != 0) {
            size_t k = 0;
            while (buf[done + k] == table[at + k]) k++;
            fail_mismatch(c, c->got + done + k, table[at + k], buf[done + k]);
        }
        done += run;
    }
}

static void on_readable(struct conn *c) {
    ssize_t r = read(c->fd, rbuf, READ_BUF);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        if (cfg.mode == HOLD && c->state == LOADED) lost++; /* reset while held */
        drop(c, 1);
        return;
    }
    if (r == 0) { /* the server closed: in hold mode a lost connection, else an error */
        if (cfg.mode == HOLD && c->state == LOADED) lost++;
        drop(c, cfg.mode != HOLD);
        return;
    }
    verify(c, rbuf, (size_t)r);
    c->got += (uint64_t)r;
    uint64_t t = now_ns();
    if (c->state == LOADED) count_bytes(t, (size_t)r);
    if (cfg.mode == STREAM && c->state == LOADED) {
        if (pump(c, send_limit(c)) < 0) drop(c, 1);
    } else if (c->got == c->goal) {
        on_echoed(c, t);
    }
}

static void dispatch(struct epoll_event *e) {
    struct conn *c = e->data.ptr;
    if (!c) return;
    if (c->state == CONNECTING) { on_connected(c); return; }
    if (c->state == FREE || c->state == CLOSED) return;
    if (e->events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
    if ((c->state == CHECKING || c->state == LOADED) && (e->events & EPOLLOUT) &&
        pump(c, send_limit(c)) < 0)
        drop(c, 1);
}

/* one epoll round; idle time counts only while measuring */
static void poll_once(int timeout_ms) {
    struct epoll_event evs[MAX_EVENTS];
    uint64_t t = now_ns();
    int n = epoll_wait(ep, evs, MAX_EVENTS, cfg.block ? timeout_ms : 0);
    if (measuring && !stopping && (n == 0 || cfg.block)) idle_ns += now_ns() - t;
    for (int i = 0; i < n; i++) dispatch(&evs[i]);
}

/* --- phases --- */

static void start_measuring(void) {
    measuring = 1;
    t_measure = t_last_progress = now_ns();
    cpu_at_measure = self_cpu_s();
}

static void stop_measuring(void) {
    stopping = 1;
    t_stop = now_ns();
}

/* open every connection and do one verified echo on each (bounded by setup_timeout) */
static void setup_all(void) {
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(cfg.setup_timeout * 1e9);
    int next = 0;
    while (now_ns() < deadline) {
        while (next < cfg.conns && connecting + (opened - checked) < SETUP_PARALLEL)
            open_conn(&conn[next++]);
        if (next == cfg.conns && connecting == 0 && opened == checked) break;
        poll_once(5);
    }
    for (int i = 0; i < cfg.conns; i++) /* whatever did not finish in time is an error */
        if (conn[i].state == CONNECTING || conn[i].state == CHECKING || i >= next) {
            if (i >= next) { conn[i].state = CLOSED; errors++; } else { drop(&conn[i], 1); }
            timeouts++;
        }
    setup_s = (now_ns() - t0) / 1e9;
}

static int inflight(void) {
    int n = 0;
    for (int i = 0; i < cfg.conns; i++)
        if (conn[i].state == LOADED && conn[i].got < conn[i].sent) n++;
    return n;
}

static void kick_all(uint64_t t) {
    for (int i = 0; i < cfg.conns; i++) {
        struct conn *c = &conn[i];
        if (c->state != LOADED) continue;
        if (cfg.mode == PINGPONG) {
            if (cfg.count && started >= cfg.count) break;
            started++;
            next_message(c, t);
        }
        if (pump(c, send_limit(c)) < 0) drop(c, 1);
    }
}

/* warm-up -> measuring once warm_end passes -> stopping (draining) once *end passes */
static void advance_phase(uint64_t t, uint64_t warm_end, uint64_t *end, uint64_t *drain_end) {
    if (!measuring && t >= warm_end) {
        start_measuring();
        *end = t_measure + (uint64_t)(cfg.seconds * 1e9);
    } else if (measuring && !stopping && t >= *end) {
        stop_measuring();
        *drain_end = t + (uint64_t)(DRAIN_S * 1e9);
    }
}

static void expire_cycles(uint64_t t);

/* --gate: print EVENT (if any), then wait for a line or EOF on stdin (at most GATE_S) */
static void gate(const char *event) {
    if (!cfg.gate) return;
    if (event) {
        printf("{\"event\":\"%s\"}\n", event);
        fflush(stdout);
    }
    struct pollfd in = {.fd = 0, .events = POLLIN};
    uint64_t end = now_ns() + (uint64_t)GATE_S * 1000000000ull;
    char b[128];
    while (now_ns() < end) {
        if (poll(&in, 1, 100) <= 0) continue;
        ssize_t r = read(0, b, sizeof b);
        if (r <= 0 || memchr(b, '\n', (size_t)r)) return;
    }
}

/* --count: the counted work is done (and, for pingpong and stream, all echoed back) */
static int counted_done(void) {
    if (cfg.mode == CHURN) return started >= cfg.count && connecting == 0 && opened == 0;
    if (cfg.mode == STREAM) return budget == 0 && inflight() == 0;
    return started >= cfg.count && inflight() == 0;
}

/* --count: COUNT units of work after setup, bounded by SECONDS; 1 if the clock cut it short */
static int run_counted(void) {
    gate("ready");
    uint64_t t = now_ns(), end = t + (uint64_t)(cfg.seconds * 1e9), drain_end = 0;
    int cut = 0;
    budget = cfg.count;
    start_measuring();
    if (cfg.mode != CHURN) kick_all(t);
    for (;;) {
        t = now_ns();
        if (cfg.mode == CHURN && !stopping) {
            for (int i = 0; i < cfg.conns && started < cfg.count; i++)
                if (conn[i].state == FREE || conn[i].state == CLOSED) {
                    started++;
                    open_conn(&conn[i]);
                }
            expire_cycles(t);
        }
        if (!stopping && counted_done()) {
            stop_measuring();
            break;
        }
        if (!stopping && t >= end) {
            cut = 1;
            stop_measuring();
            drain_end = t + (uint64_t)(DRAIN_S * 1e9);
        }
        if (stopping && (counted_done() || t >= drain_end)) break;
        if (cfg.mode != CHURN && !checked) break;
        poll_once(5);
    }
    report(cut ? "--count not reached within --seconds" : NULL);
    gate(NULL);
    return cut;
}

static int run_load(void) {
    setup_all();
    if (!checked) { report("no connection completed its first echo"); return 1; }
    if (cfg.count) return run_counted();
    uint64_t t = now_ns(), warm_end = t + (uint64_t)(cfg.warmup * 1e9), end = 0, drain_end = 0;
    kick_all(t);
    for (;;) {
        t = now_ns();
        advance_phase(t, warm_end, &end, &drain_end);
        if (stopping && (inflight() == 0 || t >= drain_end)) break;
        if (!checked) { if (measuring && !stopping) stop_measuring(); break; }
        poll_once(5);
    }
    report(checked ? NULL : "every connection failed");
    return 0;
}

static void expire_cycles(uint64_t t) {
    for (int i = 0; i < cfg.conns; i++) {
        struct conn *c = &conn[i];
        if ((c->state == CONNECTING || c->state == CHECKING) &&
            (int64_t)(t - c->t_msg) > (int64_t)(CYCLE_TIMEOUT_S * 1e9)) {
            timeouts++;
            drop(c, 1);
        }
    }
}

static int run_churn(void) {
    if (cfg.count) return run_counted();
    uint64_t t = now_ns(), warm_end = t + (uint64_t)(cfg.warmup * 1e9), end = 0, drain_end = 0;
    uint64_t next_expiry = t;
    for (;;) {
        t = now_ns();
        advance_phase(t, warm_end, &end, &drain_end);
        if (!stopping)
            for (int i = 0; i < cfg.conns; i++)
                if (conn[i].state == FREE || conn[i].state == CLOSED) open_conn(&conn[i]);
        if (t >= next_expiry) {
            expire_cycles(t);
            next_expiry = t + 10000000ull;
        }
        if (stopping && ((connecting == 0 && opened == 0) || t >= drain_end)) break;
        poll_once(5);
    }
    report(NULL);
    return 0;
}

static int run_hold(void) {
    setup_all();
    held = checked;
    printf("{\"event\":\"held\",\"conns\":%d,\"conns_ready\":%d,\"setup_s\":%.3f}\n", cfg.conns,
           checked, setup_s);
    fflush(stdout);
    struct epoll_event in = {.events = EPOLLIN, .data.ptr = NULL}, evs[MAX_EVENTS];
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &in); /* fails for files and /dev/null: then SECONDS */
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(cfg.seconds * 1e9);
    int released = 0;
    while (!released && now_ns() < end) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 50);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr) { dispatch(&evs[i]); continue; }
            char b[128];
            ssize_t r = read(0, b, sizeof b);
            if (r <= 0 || memchr(b, '\n', (size_t)r)) released = 1;
        }
    }
    held_s = (now_ns() - t0) / 1e9;
    struct linger rst = {.l_onoff = 1, .l_linger = 0};
    for (int i = 0; i < cfg.conns; i++)
        if (conn[i].fd >= 0) {
            setsockopt(conn[i].fd, SOL_SOCKET, SO_LINGER, &rst, sizeof rst);
            close(conn[i].fd);
        }
    report(NULL);
    return 0;
}

/* --- command line --- */

static void usage_exit(const char *why) {
    fprintf(stderr, "loadgen: %s\nusage: loadgen --mode pingpong|stream|churn|hold --port P "
            "[--host 127.x.x.x] [--conns N] [--size B] [--seconds S] [--warmup S] "
            "[--window B] [--setup-timeout S] [--block] [--count N] [--gate]\n", why);
    exit(1);
}

static void parse_args(int argc, char **argv) {
    static const struct option opts[] = {
        {"mode", 1, 0, 'm'}, {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'},
        {"conns", 1, 0, 'c'}, {"size", 1, 0, 's'}, {"seconds", 1, 0, 't'},
        {"warmup", 1, 0, 'w'}, {"window", 1, 0, 'W'}, {"setup-timeout", 1, 0, 'S'},
        {"block", 0, 0, 'B'}, {"count", 1, 0, 'n'}, {"gate", 0, 0, 'g'}, {0, 0, 0, 0}};
    const char *host = "127.0.0.1", *mode = NULL;
    int port = 0, o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'm': mode = optarg; break;
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': cfg.conns = atoi(optarg); break;
        case 's': cfg.size = strtoul(optarg, NULL, 10); break;
        case 't': cfg.seconds = atof(optarg); break;
        case 'w': cfg.warmup = atof(optarg); break;
        case 'W': cfg.window = strtoul(optarg, NULL, 10); break;
        case 'S': cfg.setup_timeout = atof(optarg); break;
        case 'B': cfg.block = 1; break;
        case 'n': cfg.count = strtoull(optarg, NULL, 10); break;
        case 'g': cfg.gate = 1; break;
        default: usage_exit("unknown option");
        }
    }
    static const char *names[] = {"pingpong", "stream", "churn", "hold"};
    cfg.mode_name = NULL;
    for (int i = 0; i < 4 && mode; i++)
        if (!strcmp(mode, names[i])) { cfg.mode = (enum mode)i; cfg.mode_name = names[i]; }
    if (!cfg.mode_name) usage_exit("--mode must be pingpong, stream, churn or hold");
    if (port < 1 || port > 65535) usage_exit("--port must be 1-65535");
    cfg.addr.sin_family = AF_INET;
    cfg.addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &cfg.addr.sin_addr) != 1 ||
        (ntohl(cfg.addr.sin_addr.s_addr) >> 24) != 127)
        usage_exit("--host must be an IPv4 loopback address (127.x.x.x)");
    if (cfg.conns < 1 || cfg.conns > 100000) usage_exit("--conns must be 1-100000");
    if (cfg.size < 1 || cfg.size > MAX_SIZE) usage_exit("--size must be 1-262144");
    if (!(cfg.seconds > 0 && cfg.seconds < 3600) || !(cfg.warmup >= 0 && cfg.warmup < 600) ||
        !(cfg.setup_timeout > 0 && cfg.setup_timeout < 600))
        usage_exit("--seconds, --warmup, --setup-timeout out of range");
    if (cfg.window < cfg.size) cfg.window = cfg.size;
    if (cfg.gate && !cfg.count) usage_exit("--gate needs --count");
    if (cfg.count > 1000000000000ull || (cfg.count && cfg.mode == HOLD))
        usage_exit("--count must be 1-10^12, and not with hold");
}

static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    alarm((unsigned)(cfg.setup_timeout + cfg.warmup + cfg.seconds) + GRACE_S +
          (cfg.gate ? 2 * GATE_S : 0));
    raise_fd_limit();
    fill_table();
    conn = calloc((size_t)cfg.conns, sizeof *conn);
    if (!conn) { perror("calloc"); return 1; }
    for (int i = 0; i < cfg.conns; i++) conn[i].fd = -1;
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) { perror("epoll_create1"); return 1; }
    switch (cfg.mode) {
    case CHURN: return run_churn();
    case HOLD: return run_hold();
    default: return run_load();
    }
}
