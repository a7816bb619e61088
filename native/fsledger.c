/*
 * fsledger's launcher: the `fsledger` command that `make install` / `make run` put in the
 * virtualenv (native/install.sh), in front of the Python console script.
 *
 * It does one thing itself: `fsledger [--db URL] scan [REPO]... [--json] [--verify]` while
 * `fsledger run` keeps the repositories is handed to that daemon over its control socket,
 * and the daemon's answer printed, exactly as the Python client does (src/fsledger/entry.py
 * and src/fsledger/control.py hold the rules and the protocol; tests/test_control.py runs
 * both clients against real daemons and compares their output byte for byte). A Python
 * command cannot start in less time than the daemon takes to rescan a small library
 * (docs/benchmarks.md, "the video rescan"): this one starts in about a millisecond.
 *
 * Everything else, and every case it is not sure to answer as the Python client would (an
 * option it does not know, a setting in the environment, a path it would have to normalise,
 * no daemon, a request the daemon declines), goes to the Python console script, exec-ed with
 * the same arguments and environment: FSLEDGER_SCRIPT, fixed when this file is built.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef FSLEDGER_SCRIPT
#error "build with -DFSLEDGER_SCRIPT='\"/path/to/the/python/console/script\"'"
#endif

extern char **environ;

/* control.py's MAX_SOCKET_PATH and ACCEPTED_NOTE. */
#define MAX_SOCKET_PATH 107
static const char ACCEPTED_NOTE[] =
    "fsledger: the running 'fsledger run' keeps this repository and runs the scan "
    "(its progress: fsledger status, or the dashboard)";

static char **g_argv;

/* The Python console script, with our arguments: whatever this launcher does not serve. */
static void python(void) {
    g_argv[0] = (char *)FSLEDGER_SCRIPT;
    execv(FSLEDGER_SCRIPT, g_argv);
    fprintf(stderr, "fsledger: cannot run %s: %s\n", FSLEDGER_SCRIPT, strerror(errno));
    exit(127);
}

static int starts_with(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* entry.main: any setting in the environment but the database's (and a valid log level,
 * which decides nothing a served scan prints) goes to the full CLI. */
static int settings_in_environment(void) {
    static const char *const prefixes[] = {"FSLEDGER_", "RECONCILIATION_", "FILE_WATCHER_",
                                           "_FSLEDGER_"};
    static const char *const levels[] = {"DEBUG", "INFO", "WARNING", "ERROR"};
    for (char **e = environ; *e; e++) {
        int ours = 0;
        for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
            ours |= starts_with(*e, prefixes[i]);
        if (!ours || starts_with(*e, "FSLEDGER_DATABASE_URL="))
            continue;
        if (starts_with(*e, "FSLEDGER_LOG_LEVEL=")) {
            const char *v = *e + strlen("FSLEDGER_LOG_LEVEL=");
            int valid = 0;
            for (size_t i = 0; i < sizeof levels / sizeof *levels; i++)
                valid |= strcasecmp(v, levels[i]) == 0;
            if (valid)
                continue;
        }
        return 1;
    }
    return 0;
}

/* A path this launcher takes as os.path would leave it: absolute, no empty, "." or ".."
 * component, no trailing slash (anything else: the Python client normalises it). */
static int plain_absolute(const char *p) {
    if (p[0] != '/' || p[1] == '\0')
        return 0;
    size_t n = strlen(p);
    return p[n - 1] != '/' && !strstr(p, "//") && !strstr(p, "/./") && !strstr(p, "/../") &&
           strcmp(p + n - 2, "/.") != 0 && (n < 3 || strcmp(p + n - 3, "/..") != 0);
}

/* zlib's crc32 (the IEEE polynomial, reflected), of a key of a few hundred bytes. */
static uint32_t crc32_of(const unsigned char *s, size_t n, int reversed) {
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        crc ^= reversed ? s[n - 1 - i] : s[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1u));
    }
    return ~crc;
}

/* A buffer that grows; NULL data after a failed allocation (then: Python). */
struct buf {
    char *data;
    size_t len, cap;
};

static void put(struct buf *b, const void *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *grown = realloc(b->data, cap);
        if (!grown)
            python();
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* Write all of a line to fd 1 or 2; a closed pipe ends the command (exit 1, as the Python
 * client's _pacify). */
static void emit(int fd, const char *s, size_t n) {
    while (n) {
        ssize_t w = write(fd, s, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            exit(1);
        }
        s += w;
        n -= (size_t)w;
    }
}

static int answered;

/* One line of the daemon's answer: its tag, then what the Python client does with it. */
static void answer_line(const char *line, size_t len) {
    char tag = len ? line[0] : '\0';
    if (tag == 'd' && !answered)
        python(); /* declined: the command does the work itself */
    answered = 1;
    if (tag == 'a') {
        if (isatty(2)) {
            emit(2, ACCEPTED_NOTE, sizeof ACCEPTED_NOTE - 1);
            emit(2, "\n", 1);
        }
    } else if (tag == 'o' || tag == 'e') {
        emit(tag == 'o' ? 1 : 2, line + 1, len - 1);
        emit(tag == 'o' ? 1 : 2, "\n", 1);
    } else if (tag == 'x') {
        char code[16] = {0};
        memcpy(code, line + 1, len - 1 < sizeof code - 1 ? len - 1 : sizeof code - 1);
        exit(atoi(code));
    }
}

int main(int argc, char **argv) {
    g_argv = argv;
    if (settings_in_environment())
        python();

    /* entry._split_db, then entry._served_scan's checks. */
    int i = 1;
    const char *url = NULL;
    if (i + 1 < argc && strcmp(argv[i], "--db") == 0) {
        url = argv[i + 1];
        i += 2;
    } else if (i < argc && starts_with(argv[i], "--db=")) {
        url = argv[i] + strlen("--db=");
        i += 1;
    }
    if (url && !*url)
        url = NULL; /* entry: ``url or env_database_url(env)`` */
    if (i >= argc || strcmp(argv[i], "scan") != 0)
        python();
    int as_json = 0, verify = 0;
    for (int k = i + 1; k < argc; k++) {
        if (strcmp(argv[k], "--json") == 0)
            as_json = 1;
        else if (strcmp(argv[k], "--verify") == 0)
            verify = 1;
        else if (argv[k][0] == '-')
            python(); /* --force, --help, "--", "-" ...: the full CLI's */
    }

    /* entry.env_database_url and entry.data_home. */
    if (!url) {
        url = getenv("FSLEDGER_DATABASE_URL");
        if (!url || !*url)
            url = NULL;
    }
    struct buf dir = {0}, key = {0};
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    const char *data = getenv("XDG_DATA_HOME");
    const char *home = getenv("HOME");
    struct buf home_data = {0}; /* data_home(env) */
    if (data && *data) {
        if (!plain_absolute(data))
            python();
        puts_(&home_data, data);
    } else {
        if (!home || !plain_absolute(home))
            python();
        puts_(&home_data, home);
        puts_(&home_data, "/.local/share");
    }
    puts_(&home_data, "/fsledger");
    if (runtime && *runtime) {
        if (!plain_absolute(runtime))
            python();
        puts_(&dir, runtime);
        puts_(&dir, "/fsledger");
    } else {
        puts_(&dir, home_data.data);
        puts_(&dir, "/run");
    }
    struct buf default_url = {0};
    if (!url) {
        puts_(&default_url, "sqlite://");
        puts_(&default_url, home_data.data);
        puts_(&default_url, "/fsledger.db");
        url = default_url.data;
    }

    /* control.database_key: a SQLite file by its real path (it must exist: a daemon has it
     * open; otherwise the Python client resolves what it can and declines). */
    if (starts_with(url, "sqlite:///")) {
        char real[PATH_MAX];
        if (!realpath(url + strlen("sqlite://"), real))
            python();
        puts_(&key, "sqlite://");
        puts_(&key, real);
    } else {
        puts_(&key, url);
    }

    /* control.socket_path and control.private_dir. */
    char name[32];
    snprintf(name, sizeof name, "/%08x%08x.sock",
             crc32_of((const unsigned char *)key.data, key.len, 0),
             crc32_of((const unsigned char *)key.data, key.len, 1));
    struct buf path = {0};
    puts_(&path, dir.data);
    puts_(&path, name);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (path.len > MAX_SOCKET_PATH || path.len >= sizeof addr.sun_path)
        python();
    struct stat st;
    if (stat(dir.data, &st) != 0 || st.st_uid != geteuid() || (st.st_mode & 077))
        python();
    memcpy(addr.sun_path, path.data, path.len + 1);

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        python(); /* no daemon: no socket, or one left by a dead process */

    /* The request: scan NUL key NUL cwd NUL flags [NUL REPO]... */
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd))
        python();
    struct buf req = {0};
    puts_(&req, "scan");
    put(&req, "", 1);
    put(&req, key.data, key.len);
    put(&req, "", 1);
    puts_(&req, cwd);
    put(&req, "", 1);
    if (as_json)
        puts_(&req, "j");
    if (verify)
        puts_(&req, "v");
    for (int k = i + 1; k < argc; k++) {
        if (strcmp(argv[k], "--json") == 0 || strcmp(argv[k], "--verify") == 0)
            continue;
        put(&req, "", 1);
        puts_(&req, argv[k]);
    }
    signal(SIGPIPE, SIG_IGN);
    for (size_t sent = 0; sent < req.len;) {
        ssize_t w = send(sock, req.data + sent, req.len - sent, 0);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            python(); /* nothing printed yet: the command scans by itself */
        }
        sent += (size_t)w;
    }
    shutdown(sock, SHUT_WR);

    /* The answer: lines of a tag and a text (control.ask_scan). */
    struct buf pending = {0};
    char chunk[65536];
    for (;;) {
        ssize_t n = recv(sock, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        put(&pending, chunk, (size_t)n);
        size_t off = 0;
        char *nl;
        while ((nl = memchr(pending.data + off, '\n', pending.len - off))) {
            answer_line(pending.data + off, (size_t)(nl - pending.data) - off);
            off = (size_t)(nl - pending.data) + 1;
        }
        memmove(pending.data, pending.data + off, pending.len - off);
        pending.len -= off;
    }
    if (pending.len)
        answer_line(pending.data, pending.len);
    if (!answered)
        python(); /* the daemon closed the connection without a word */
    static const char stopped[] = "fsledger: error: the daemon stopped before the scan ended\n";
    emit(2, stopped, sizeof stopped - 1);
    return 1;
}
