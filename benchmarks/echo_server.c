/*
 * The reference row: a small single-threaded epoll line-echo server in C,
 * answering each line upper-cased. It shows what one core can do, so the
 * Python rows can be read as a fraction of it.
 *
 *   echo_server PORT      (0: the OS picks; prints "READY <port>")
 * Binds 127.0.0.1 only. Runs until SIGTERM or SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
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

typedef struct {
    int fd;
    size_t len;          /* bytes buffered, not yet answered */
    char buf[65536 + 1];
} client_t;

static volatile sig_atomic_t stopping;
static void on_signal(int sig) { (void)sig; stopping = 1; }

static void drop(int ep, client_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* Answer every complete line in the buffer; returns -1 if the client is gone. */
static int serve(client_t *c) {
    for (;;) {
        ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len, 0);
        if (n == 0) return -1;
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->len += (size_t)n;
        char *start = c->buf, *end = c->buf + c->len, *nl;
        while ((nl = memchr(start, '\n', (size_t)(end - start))) != NULL) {
            for (char *p = start; p <= nl; p++) *p = (char)toupper((unsigned char)*p);
            size_t len = (size_t)(nl - start + 1), off = 0;
            while (off < len) { /* a blocking-ish write: lines are small */
                ssize_t w = send(c->fd, start + off, len - off, MSG_NOSIGNAL);
                if (w < 0) { if (errno == EAGAIN) continue; return -1; }
                off += (size_t)w;
            }
            start = nl + 1;
        }
        c->len = (size_t)(end - start);
        memmove(c->buf, start, c->len);
        if (c->len == sizeof c->buf - 1) return -1; /* a line longer than the buffer */
    }
}

int main(int argc, char **argv) {
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)(argc > 1 ? atoi(argv[1]) : 0))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, SOMAXCONN) < 0) {
        perror("listen");
        return 1;
    }
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("READY %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event events[1024];
    while (!stopping) {
        int n = epoll_wait(ep, events, 1024, 200);
        for (int i = 0; i < n; i++) {
            client_t *c = events[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    client_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (serve(c) < 0) drop(ep, c);
        }
    }
    close(lfd);
    return 0;
}
