/* The floor: a minimal server and client doing the scale bench's traffic in C.
 *
 * Why: timing on a shared two-core box moves by tens of percent from run to
 * run, so hongbao's CPU per request is only meaningful next to what the same
 * traffic costs a program with no Python, no gevent and no logic, measured in
 * the same run. Compiled by app/bench/floor.py at bench time (cc -O2).
 *
 *   floor server PORT OUT [GROUPS SERVERS INDEX]
 *       one epoll process (run ~1 per 19,500 connections, SO_REUSEPORT on
 *       PORT); answers LOGIN with LOGIN_RESULT ok, SHAKE with SHAKE_RESULT
 *       "none left" and CLAIM with CLAIM_RESULT; one read and at most one
 *       write per ready socket. A timer in the same epoll at a SET's
 *       generation ticks (10 a second, on the wall clock) measures how late
 *       the loop wakes: the floor under a SET's loop lag. At those ticks,
 *       while SHAKEs arrive (this second or the last), it pushes its share
 *       (INDEX of SERVERS) of GROUPS group envelopes a second, each an
 *       ENVELOPE_PUSH to three logged-in connections picked at random: the
 *       group traffic hongbao's bench carries too. Scheduled SCHED_BATCH,
 *       as a SET (and the clients, as hongbao's client workers). On SIGTERM
 *       writes "second shakes lag_us pushes claims" lines (arrivals; the
 *       second's worst lateness; pushes written; claims answered) to OUT
 *       and exits.
 *   floor client PORT SOURCES FIRST COUNT TICKS RATE PROCS INDEX OUT [QUIET]
 *       COUNT connections (users FIRST..), source addresses SOURCES (comma
 *       separated, IP_BIND_ADDRESS_NO_PORT), at most RATE new attempts a
 *       second; prints "ready N" once all are logged in. Then reads one line
 *       "START QPS SECONDS [QPS SECONDS ...]" (fleet-wide QPS; this process
 *       sends share INDEX of PROCS) and sends, in TICKS wall-clock ticks a
 *       second, one write per request, the rotating window of the scheduler
 *       (the last QUIET ticks of a second send nothing, as a worker's). It
 *       answers each ENVELOPE_PUSH it reads with a CLAIM, as a worker does.
 *       At the end writes one JSON line per second to OUT: sent, answered
 *       (by the second the answer arrived, SO_TIMESTAMPNS, as hongbao's
 *       workers count), the latency histogram in app.client.histogram's
 *       buckets, and claims sent and answered, then exits (SO_LINGER 0: no
 *       TIME_WAIT left behind).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_SECONDS 7200
#define BUCKETS 256
#define BATCH 1024
#define MAX_IN_FLIGHT 1000
#define GEN_TICKS 10  /* app.server.service.GEN_TICKS */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void put16(unsigned char *p, unsigned v) { p[0] = v >> 8; p[1] = v; }
static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static void put64(unsigned char *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, (uint32_t)v); }
static unsigned get16(const unsigned char *p) { return (p[0] << 8) | p[1]; }
static uint32_t get32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3];
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* ------------------------------------------------------------------ server */

struct sconn { uint32_t userid; uint8_t inlen; unsigned char in[64]; };

static volatile sig_atomic_t stopping;
static void on_term(int sig) { (void)sig; stopping = 1; }

/* scheduled as hongbao's SETs and client workers are (app.arbiter.batch_scheduling) */
static void batch_scheduling(void) {
    struct sched_param sp = {0};
    sched_setscheduler(0, SCHED_BATCH, &sp);
}

/* ENVELOPE_PUSH of group envelope `eid` (a share of 1) to `fd`, naming recipients r. */
static int push(int fd, uint32_t eid, long second, const uint32_t r[3]) {
    unsigned char f[36];
    put16(f, 36); put16(f + 2, 4); put64(f + 4, (uint64_t)second);
    put32(f + 12, eid); put32(f + 16, 1); put32(f + 20, 3);
    for (int k = 0; k < 3; k++) put32(f + 24 + 4 * k, r[k]);
    return write(fd, f, 36) == 36;
}

static int server(int port, const char *out, long groups) {
    raise_nofile();
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    size_t cap = rl.rlim_cur;
    struct sconn *conns = calloc(cap, sizeof *conns);
    static long arrivals[MAX_SECONDS], lag_us[MAX_SECONDS], pushes[MAX_SECONDS],
        claims[MAX_SECONDS];
    int maxfd = 0;
    uint32_t next_eid = 1;
    long base = (long)now_s();
    signal(SIGTERM, on_term);
    batch_scheduling();

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 65535)) {
        perror("floor server: bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    /* the generation ticks: 10 a second on wall-clock boundaries, as a SET's */
    int tfd = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
    double first = (double)((long)(now_s() * GEN_TICKS) + 1) / GEN_TICKS;
    struct itimerspec its = {.it_interval = {0, 1000000000L / GEN_TICKS},
                             .it_value = {(time_t)first, (long)((first - (long)first) * 1e9)}};
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    struct epoll_event tev = {.events = EPOLLIN, .data.fd = tfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    printf("listening\n");
    fflush(stdout);

    struct epoll_event events[BATCH];
    unsigned char inb[4096], outb[4096 / 16 * 28 + 28];
    while (!stopping) {
        int n = epoll_wait(ep, events, BATCH, 500);
        if (n < 0) continue;  /* EINTR: the loop checks stopping */
        long sec = (long)now_s() - base;
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == tfd) {
                uint64_t expired = 0;
                if (read(tfd, &expired, sizeof expired) == sizeof expired && expired) {
                    double t = now_s();  /* late by: since the last tick, plus any missed */
                    double late = t - (double)(long)(t * GEN_TICKS) / GEN_TICKS
                                  + (double)(expired - 1) / GEN_TICKS;
                    long at = (long)t - base;
                    if (at >= 0 && at < MAX_SECONDS && late * 1e6 > lag_us[at])
                        lag_us[at] = (long)(late * 1e6);
                    /* group envelopes, while SHAKEs arrive (this second or the last) */
                    long k = (long)(t * GEN_TICKS) % GEN_TICKS;
                    long due = groups * (k + 1) / GEN_TICKS - groups * k / GEN_TICKS;
                    int loaded = at >= 1 && at < MAX_SECONDS && (arrivals[at] || arrivals[at - 1]);
                    for (long g = 0; loaded && g < due && maxfd > lfd; g++) {
                        int fds[3], picked = 0;
                        for (int tries = 0; tries < 64 && picked < 3; tries++) {
                            int c = lfd + 1 + rand() % (maxfd - lfd);
                            if (!conns[c].userid || (picked && fds[0] == c)
                                || (picked > 1 && fds[1] == c))
                                continue;
                            fds[picked++] = c;
                        }
                        if (picked < 3) break;
                        uint32_t r[3] = {conns[fds[0]].userid, conns[fds[1]].userid,
                                         conns[fds[2]].userid};
                        for (int j = 0; j < 3; j++)
                            pushes[at] += push(fds[j], next_eid, (long)t, r);
                        next_eid++;
                    }
                }
                continue;
            }
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if ((size_t)c >= cap) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conns[c].inlen = 0;
                    conns[c].userid = 0;
                    if (c > maxfd) maxfd = c;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            struct sconn *s = &conns[fd];
            ssize_t got = read(fd, inb + s->inlen, sizeof inb - s->inlen);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) continue;
                s->userid = 0;
                close(fd);
                continue;
            }
            memcpy(inb, s->in, s->inlen);
            size_t len = s->inlen + got, off = 0, w = 0;
            int bad = 0;
            while (len - off >= 4) {
                unsigned flen = get16(inb + off), cmd = get16(inb + off + 2);
                if (flen < 16 || flen > 64) { bad = 1; break; }
                if (len - off < flen) break;
                if (cmd == 0) {  /* LOGIN */
                    s->userid = get32(inb + off + 12);
                    put16(outb + w, 20); put16(outb + w + 2, 1); put64(outb + w + 4, sec + base);
                    put32(outb + w + 12, s->userid); put32(outb + w + 16, 0);
                    w += 20;
                } else if (cmd == 2) {  /* SHAKE */
                    if (sec >= 0 && sec < MAX_SECONDS) arrivals[sec]++;
                    put16(outb + w, 28); put16(outb + w + 2, 3); put64(outb + w + 4, sec + base);
                    put32(outb + w + 12, s->userid); put32(outb + w + 16, 15);
                    put32(outb + w + 20, 0); put32(outb + w + 24, 0);
                    w += 28;
                } else if (cmd == 5 && flen == 20) {  /* CLAIM: its share, 1 */
                    if (sec >= 0 && sec < MAX_SECONDS) claims[sec]++;
                    put16(outb + w, 20); put16(outb + w + 2, 6); put64(outb + w + 4, sec + base);
                    put32(outb + w + 12, get32(inb + off + 16)); put32(outb + w + 16, 1);
                    w += 20;
                }
                off += flen;
            }
            if (bad) { s->userid = 0; close(fd); continue; }
            s->inlen = len - off;
            memcpy(s->in, inb + off, s->inlen);
            if (w && write(fd, outb, w) < 0 && errno != EAGAIN) { s->userid = 0; close(fd); }
        }
    }
    FILE *f = fopen(out, "w");
    if (!f) return 1;
    for (int i = 0; i < MAX_SECONDS; i++)
        if (arrivals[i] || lag_us[i] || pushes[i] || claims[i])
            fprintf(f, "%ld %ld %ld %ld %ld\n", base + i, arrivals[i], lag_us[i], pushes[i],
                    claims[i]);
    fclose(f);
    return 0;
}

/* ------------------------------------------------------------------ client */

enum { DOWN, CONNECTING, LOGGING_IN, READY };

struct cconn {
    int fd;
    uint8_t state, inlen;
    uint16_t nout;  /* SHAKEs unanswered */
    double t0;  /* send time of the oldest unanswered SHAKE */
    unsigned char in[64];
};

struct second { long sent, answered, claims, claimed; uint32_t hist[BUCKETS]; };

static int bucket(long us) {
    if (us < 16) return us < 0 ? 0 : (int)us;
    int bits = 64 - __builtin_clzl((unsigned long)us);
    int shift = bits - 3 - 1;
    int b = 8 + shift * 8 + (int)((us >> shift) & 7);
    return b < BUCKETS ? b : BUCKETS - 1;
}

static struct sockaddr_in server_addr;
static struct in_addr *sources;
static int nsources;
static int ep;
static struct cconn *cc;
static int *conn_of_fd;
static long count, first_user, ready, in_flight;

static void client_close(long i) {
    struct cconn *c = &cc[i];
    if (c->fd >= 0) {
        conn_of_fd[c->fd] = -1;
        close(c->fd);
    }
    if (c->state == READY) ready--;
    if (c->state == CONNECTING || c->state == LOGGING_IN) in_flight--;
    c->fd = -1;
    c->state = DOWN;
    c->nout = 0;
    c->inlen = 0;
}

static int client_connect(long i) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    struct linger lg = {1, 0};
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    /* answers stamped on arrival, as hongbao's workers measure (app.reactor.read_stamped) */
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    if (nsources) {
        setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr = sources[i % nsources]};
        if (bind(fd, (struct sockaddr *)&src, sizeof src)) { close(fd); return -1; }
    }
    if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    cc[i].fd = fd;
    cc[i].state = CONNECTING;
    conn_of_fd[fd] = (int)i;
    in_flight++;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static struct second *secs;
static long sec_base;

static struct second *sec_at(long t) {
    long k = t - sec_base;
    return k >= 0 && k < MAX_SECONDS ? &secs[k] : NULL;
}

static void client_read(long i, double now) {
    struct cconn *c = &cc[i];
    unsigned char buf[4096 + 64];
    memcpy(buf, c->in, c->inlen);
    char control[CMSG_SPACE(sizeof(struct timespec))];
    struct iovec iov = {buf + c->inlen, 4096};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    ssize_t got = recvmsg(c->fd, &msg, 0);
    if (got <= 0) {
        if (got < 0 && errno == EAGAIN) return;
        client_close(i);
        return;
    }
    for (struct cmsghdr *m = CMSG_FIRSTHDR(&msg); m; m = CMSG_NXTHDR(&msg, m))
        if (m->cmsg_level == SOL_SOCKET && m->cmsg_type == SO_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(m), sizeof ts);
            now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;  /* when it arrived */
        }
    size_t len = c->inlen + got, off = 0;
    while (len - off >= 4) {
        unsigned flen = get16(buf + off), cmd = get16(buf + off + 2);
        if (flen < 12 || flen > 64) { client_close(i); return; }
        if (len - off < flen) break;
        if (cmd == 1 && c->state == LOGGING_IN) {
            c->state = READY;
            in_flight--;
            ready++;
        } else if (cmd == 3) {
            struct second *s = sec_at((long)now);
            if (s) {
                s->answered++;
                if (c->nout) s->hist[bucket((long)((now - c->t0) * 1e6))]++;
            }
            if (c->nout && --c->nout) c->t0 = now;
        } else if (cmd == 4 && flen == 36) {  /* ENVELOPE_PUSH: claim it (userid 0: me) */
            unsigned char f[20];
            put16(f, 20); put16(f + 2, 5); put64(f + 4, (uint64_t)now);
            put32(f + 12, 0); put32(f + 16, get32(buf + off + 12));
            struct second *s = sec_at((long)now);
            if (write(c->fd, f, 20) == 20 && s) s->claims++;
        } else if (cmd == 6) {
            struct second *s = sec_at((long)now);
            if (s) s->claimed++;
        }
        off += flen;
    }
    c->inlen = len - off;
    memcpy(c->in, buf + off, c->inlen);
}

static long share(long total, long parts, long index) {
    return total / parts + (index < total % parts ? 1 : 0);
}

static int client(int argc, char **argv) {
    if (argc < 11) return 2;
    int port = atoi(argv[2]);
    char *srcs = strdup(argv[3]);
    first_user = atol(argv[4]);
    count = atol(argv[5]);
    int ticks = atoi(argv[6]);
    double rate = atof(argv[7]);
    long procs = atol(argv[8]), index = atol(argv[9]);
    const char *out = argv[10];
    long quiet = argc > 11 ? atol(argv[11]) : 0, active = ticks - quiet;
    if (quiet < 0 || active < 1) return 2;
    raise_nofile();
    batch_scheduling();
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    conn_of_fd = malloc(sizeof(int) * rl.rlim_cur);
    for (size_t k = 0; k < rl.rlim_cur; k++) conn_of_fd[k] = -1;
    cc = calloc(count, sizeof *cc);
    for (long i = 0; i < count; i++) cc[i].fd = -1;
    sources = calloc(64, sizeof *sources);
    for (char *tok = strtok(srcs, ","); tok && nsources < 64; tok = strtok(NULL, ","))
        inet_pton(AF_INET, tok, &sources[nsources++]);
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons(port);
    server_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ep = epoll_create1(0);
    struct epoll_event events[BATCH];

    /* connect and log in everyone, at most `rate` attempts a second */
    long next = 0;
    double tokens = 0, last = now_s(), started = last;
    while (ready < count) {
        double t = now_s();
        tokens += (t - last) * rate;
        if (tokens > rate / 10 + 1) tokens = rate / 10 + 1;
        last = t;
        for (long tries = 0; tokens >= 1 && in_flight < MAX_IN_FLIGHT && tries < count; tries++) {
            long i = next;
            next = (next + 1) % count;
            if (cc[i].state != DOWN) continue;
            tokens -= 1;
            client_connect(i);
        }
        int n = epoll_wait(ep, events, BATCH, 5);
        for (int e = 0; e < n; e++) {
            int fd = events[e].data.fd;
            long i = conn_of_fd[fd];
            if (i < 0) continue;
            struct cconn *c = &cc[i];
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err || (events[e].events & (EPOLLERR | EPOLLHUP))) { client_close(i); continue; }
                unsigned char f[16];
                put16(f, 16); put16(f + 2, 0); put64(f + 4, (uint64_t)t);
                put32(f + 12, (uint32_t)(first_user + i));
                if (write(fd, f, 16) != 16) { client_close(i); continue; }
                c->state = LOGGING_IN;
                struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
            } else {
                client_read(i, t);
            }
        }
        if (t - started > 900) { fprintf(stderr, "floor client: login timeout\n"); return 1; }
    }
    printf("ready %ld\n", ready);
    fflush(stdout);

    /* the schedule: START QPS SECONDS ... */
    char line[4096];
    if (!fgets(line, sizeof line, stdin)) return 0;
    long start = 0, qps[64], dur[64];
    int nph = 0;
    char *p = line, *e;
    start = strtol(p, &e, 10);
    for (p = e; nph < 64; nph++) {
        qps[nph] = strtol(p, &e, 10);
        if (e == p) break;
        p = e;
        dur[nph] = strtol(p, &e, 10);
        p = e;
    }
    long end = start;
    for (int k = 0; k < nph; k++) end += dur[k];
    sec_base = start - 1;
    secs = calloc(MAX_SECONDS, sizeof *secs);

    int tfd = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
    struct itimerspec its = {0};
    its.it_interval.tv_nsec = 1000000000L / ticks;
    its.it_value.tv_sec = start;
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    struct epoll_event tev = {.events = EPOLLIN, .data.fd = -2 - tfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    long last_tick = start * ticks - 1;
    unsigned char frame[16];
    put16(frame, 16); put16(frame + 2, 2);
    long n_host = count;  /* this process's users are its own window */
    while (1) {
        int n = epoll_wait(ep, events, BATCH, 1000);
        double t = now_s();
        for (int k = 0; k < n; k++) {
            int fd = events[k].data.fd;
            if (fd <= -2) {
                uint64_t expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0) continue;
                long current = (long)(t * ticks);
                for (long tick = last_tick + 1; tick <= current; tick++) {
                    long second = tick / ticks, kk = tick % ticks, q = 0;
                    long at = start;
                    for (int ph = 0; ph < nph; ph++) {
                        if (second >= at && second < at + dur[ph]) q = share(qps[ph], procs, index);
                        at += dur[ph];
                    }
                    if (!q || kk >= active) continue;
                    long lo = kk * q / active, hi = (kk + 1) * q / active;
                    long pos0 = (second * q + lo) % n_host;
                    struct second *s = sec_at(second);
                    put64(frame + 4, (uint64_t)second);
                    for (long j = 0; j < hi - lo; j++) {
                        long i = (pos0 + j) % n_host;
                        struct cconn *c = &cc[i];
                        if (c->state != READY) continue;
                        put32(frame + 12, (uint32_t)(first_user + i));
                        double sent_at = now_s();  /* at the write, as hongbao's workers */
                        if (write(c->fd, frame, 16) != 16) continue;
                        if (!c->nout++) c->t0 = sent_at;
                        if (s) s->sent++;
                    }
                }
                last_tick = current;
                continue;
            }
            long i = conn_of_fd[fd];
            if (i >= 0) client_read(i, t);
        }
        if (t > end + 2) break;
    }
    FILE *f = fopen(out, "w");
    if (!f) return 1;
    for (long k = 0; k < MAX_SECONDS; k++) {
        struct second *s = &secs[k];
        if (!s->sent && !s->answered && !s->claims && !s->claimed) continue;
        fprintf(f, "{\"t\":%ld,\"sent\":%ld,\"answered\":%ld,\"claims\":%ld,\"claimed\":%ld,"
                "\"hist\":{", sec_base + k, s->sent, s->answered, s->claims, s->claimed);
        int comma = 0;
        for (int b = 0; b < BUCKETS; b++)
            if (s->hist[b]) { fprintf(f, "%s\"%d\":%u", comma ? "," : "", b, s->hist[b]); comma = 1; }
        fprintf(f, "}}\n");
    }
    fclose(f);
    return 0;
}

int main(int argc, char **argv) {
    /* a bench killed outright must not leave its floor behind */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (argc >= 4 && !strcmp(argv[1], "server")) {
        /* GROUPS SERVERS INDEX: this server's share of GROUPS group envelopes a second */
        long groups = argc >= 7 ? share(atol(argv[4]), atol(argv[5]), atol(argv[6])) : 0;
        return server(atoi(argv[2]), argv[3], groups);
    }
    if (argc >= 2 && !strcmp(argv[1], "client")) return client(argc, argv);
    fprintf(stderr, "usage: floor server PORT OUT [GROUPS SERVERS INDEX] | floor client PORT "
                    "SOURCES FIRST COUNT TICKS RATE PROCS INDEX OUT [QUIET]\n");
    return 2;
}
