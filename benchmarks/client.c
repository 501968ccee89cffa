/*
 * The benchmark's load generator: one thread, epoll, non-blocking sockets.
 *
 * Workload "line echo": send a line of lower-case letters ending in '\n'; the
 * server answers the same line upper-cased; every reply is checked byte for
 * byte.
 *
 *   client pingpong HOST PORT CONNS SECONDS LINE_BYTES
 *       CONNS persistent connections, one request in flight on each.
 *   client churn HOST PORT CONNS SECONDS LINE_BYTES SOURCES
 *       every request on a new connection; CONNS in flight; the source address
 *       rotates over 127.0.0.1 .. 127.0.0.SOURCES (one address spends the
 *       client's time in the kernel's port search).
 *   client udp HOST PORT CONNS SECONDS LINE_BYTES
 *       CONNS datagram sockets, one request in flight on each.
 *   client idle HOST PORT CONNS SECONDS
 *       open CONNS connections, print "held N" and keep them silent until
 *       SECONDS pass or stdin closes.
 *
 * Prints one JSON object: requests, errors, seconds, rps, p50_us, p99_us,
 * cpu_user_s, cpu_sys_s (the client's own CPU, to show it was not the limit).
 * Everything is bounded by SECONDS; at the end connections are half-closed and
 * drained so servers see a clean EOF rather than a reset.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { MAX_EVENTS = 1024 };

typedef struct {
    int fd;
    size_t sent;     /* bytes of the request written */
    size_t got;      /* bytes of the reply read */
    double started;  /* when this request began */
    int connecting;
    int source;      /* churn: index of the source address */
} conn_t;

static char *request_line;
static char *expected_line;
static size_t line_bytes;
static uint32_t *latencies;
static size_t n_latencies, cap_latencies;
static long errors;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void record(double seconds) {
    if (n_latencies == cap_latencies) {
        cap_latencies = cap_latencies ? cap_latencies * 2 : 1 << 20;
        latencies = realloc(latencies, cap_latencies * sizeof *latencies);
        if (!latencies) { perror("realloc"); exit(2); }
    }
    latencies[n_latencies++] = (uint32_t)(seconds * 1e6);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static void make_lines(void) {
    request_line = malloc(line_bytes);
    expected_line = malloc(line_bytes);
    for (size_t i = 0; i + 1 < line_bytes; i++) {
        request_line[i] = (char)('a' + i % 26);
        expected_line[i] = (char)('A' + i % 26);
    }
    request_line[line_bytes - 1] = expected_line[line_bytes - 1] = '\n';
}

static struct sockaddr_in server_addr;

static int open_stream(int source, int sources) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (sources > 1) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000001 + (uint32_t)(source % sources));
        /* Choose the port at connect() time, by the whole 4-tuple: a bind() to
         * port 0 searches for a port unused on that address, which is what
         * makes churn spend its time in the kernel. */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) { close(fd); return -1; }
    }
    if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Write what is left of the request; returns -1 on error. */
static int push(conn_t *c) {
    while (c->sent < line_bytes) {
        ssize_t n = send(c->fd, request_line + c->sent, line_bytes - c->sent, MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->sent += (size_t)n;
    }
    return 0;
}

/* Read the reply; returns 1 when complete and correct, 0 for more, -1 on error. */
static int pull(conn_t *c) {
    char buf[65536];
    for (;;) {
        size_t want = line_bytes - c->got;
        if (want > sizeof buf) want = sizeof buf;
        ssize_t n = recv(c->fd, buf, want, 0);
        if (n == 0) return -1;
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        if (memcmp(buf, expected_line + c->got, (size_t)n) != 0) return -1;
        c->got += (size_t)n;
        if (c->got == line_bytes) return 1;
    }
}

static void drain_and_close(conn_t *conns, int n) {
    /* Half-close, then read to EOF (briefly), so servers see a clean end. */
    for (int i = 0; i < n; i++)
        if (conns[i].fd >= 0) shutdown(conns[i].fd, SHUT_WR);
    double deadline = now() + 2.0;
    for (int i = 0; i < n; i++) {
        if (conns[i].fd < 0) continue;
        char buf[4096];
        for (;;) {
            ssize_t r = recv(conns[i].fd, buf, sizeof buf, 0);
            if (r > 0) continue;
            if (r == 0 || errno != EAGAIN || now() > deadline) break;
            struct pollfd p = {.fd = conns[i].fd, .events = POLLIN};
            poll(&p, 1, 50);
        }
        close(conns[i].fd);
    }
}

static void report(const char *mode, int conns, double seconds) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    qsort(latencies, n_latencies, sizeof *latencies, cmp_u32);
    uint32_t p50 = n_latencies ? latencies[n_latencies / 2] : 0;
    uint32_t p99 = n_latencies ? latencies[(size_t)(n_latencies * 0.99)] : 0;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"line_bytes\": %zu, \"requests\": %zu, "
           "\"errors\": %ld, \"seconds\": %.3f, \"rps\": %.1f, \"p50_us\": %u, \"p99_us\": %u, "
           "\"cpu_user_s\": %.3f, \"cpu_sys_s\": %.3f}\n",
           mode, conns, line_bytes, n_latencies, errors, seconds, n_latencies / seconds, p50, p99,
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6, ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    fflush(stdout);
}

static void restart_churn(int ep, conn_t *c, int sources, int *next_source) {
    c->fd = open_stream((*next_source)++, sources);
    c->sent = c->got = 0;
    c->connecting = 1;
    c->started = now();
    if (c->fd < 0) { errors++; return; }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static int run_streams(const char *mode, int nconns, double seconds, int sources) {
    int churn = strcmp(mode, "churn") == 0;
    int ep = epoll_create1(0);
    conn_t *conns = calloc((size_t)nconns, sizeof *conns);
    int next_source = 0;
    double t0 = now();
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        if (churn) { restart_churn(ep, &conns[i], sources, &next_source); continue; }
        conns[i].fd = open_stream(0, 1);
        if (conns[i].fd < 0) { errors++; continue; }
        conns[i].connecting = 1;
        conns[i].started = now();
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
    }
    struct epoll_event events[MAX_EVENTS];
    double end = t0 + seconds;
    while (now() < end) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 20);
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            int failed = (events[i].events & (EPOLLERR | EPOLLHUP)) != 0;
            if (!failed && c->connecting && (events[i].events & EPOLLOUT)) {
                c->connecting = 0;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                if (!churn) c->started = now();
                failed = push(c) < 0;
            }
            if (!failed && !c->connecting && (events[i].events & EPOLLIN)) {
                int r = pull(c);
                if (r < 0) failed = 1;
                else if (r == 1) {
                    record(now() - c->started);
                    if (churn) {
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                        close(c->fd);
                        restart_churn(ep, c, sources, &next_source);
                        continue;
                    }
                    c->sent = c->got = 0;
                    c->started = now();
                    failed = push(c) < 0;
                }
            }
            if (failed) {
                errors++;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->fd = -1;
                if (churn) restart_churn(ep, c, sources, &next_source);
            }
        }
    }
    double elapsed = now() - t0;
    drain_and_close(conns, nconns);
    report(mode, nconns, elapsed);
    return 0;
}

static int run_udp(int nconns, double seconds) {
    int ep = epoll_create1(0);
    conn_t *conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        connect(conns[i].fd, (struct sockaddr *)&server_addr, sizeof server_addr);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
        conns[i].started = now();
        send(conns[i].fd, request_line, line_bytes, 0);
    }
    double t0 = now(), end = t0 + seconds;
    struct epoll_event events[MAX_EVENTS];
    char buf[65536];
    while (now() < end) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 20);
        double t = now();
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            ssize_t r;
            while ((r = recv(c->fd, buf, sizeof buf, 0)) >= 0) {
                if ((size_t)r == line_bytes && memcmp(buf, expected_line, line_bytes) == 0)
                    record(t - c->started);
                else
                    errors++;
                c->started = now();
                send(c->fd, request_line, line_bytes, 0);
            }
        }
        /* A lost datagram: resend after 200 ms. */
        for (int i = 0; i < nconns; i++) {
            if (t - conns[i].started > 0.2) {
                errors++;
                conns[i].started = t;
                send(conns[i].fd, request_line, line_bytes, 0);
            }
        }
    }
    double elapsed = now() - t0;
    for (int i = 0; i < nconns; i++) close(conns[i].fd);
    report("udp", nconns, elapsed);
    return 0;
}

static int run_idle(int nconns, double seconds) {
    conn_t *conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) conns[i].fd = -1;
    int held = 0;
    double deadline = now() + 30.0;
    for (int i = 0; i < nconns && now() < deadline; i++) {
        conns[i].fd = open_stream(i, 16);
        if (conns[i].fd < 0) { errors++; continue; }
        struct pollfd p = {.fd = conns[i].fd, .events = POLLOUT};
        if (poll(&p, 1, 5000) == 1 && !(p.revents & (POLLERR | POLLHUP))) held++;
        else errors++;
    }
    printf("held %d\n", held);
    fflush(stdout);
    struct pollfd in = {.fd = 0, .events = POLLIN};
    poll(&in, 1, (int)(seconds * 1000));
    drain_and_close(conns, nconns);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s pingpong|churn|udp|idle HOST PORT CONNS SECONDS [LINE_BYTES [SOURCES]]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &server_addr.sin_addr) != 1) {
        fprintf(stderr, "HOST must be an IPv4 loopback address\n");
        return 2;
    }
    if ((ntohl(server_addr.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "refusing a non-loopback address\n");
        return 2;
    }
    int nconns = atoi(argv[4]);
    double seconds = atof(argv[5]);
    line_bytes = argc > 6 ? (size_t)atol(argv[6]) : 64;
    if (line_bytes < 2) line_bytes = 2;
    int sources = argc > 7 ? atoi(argv[7]) : 1;
    make_lines();
    if (strcmp(mode, "pingpong") == 0 || strcmp(mode, "churn") == 0)
        return run_streams(mode, nconns, seconds, sources);
    if (strcmp(mode, "udp") == 0) return run_udp(nconns, seconds);
    if (strcmp(mode, "idle") == 0) return run_idle(nconns, seconds);
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
