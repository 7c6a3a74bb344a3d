/* app.client._fastclient: the compiled twin of app.client.fastpath (read its docstring).
 *
 * Same functions, same arguments, same results; the pure-Python module is the
 * reference and tests/test_fastpath.py runs both on the same input.
 */
#include "../hotslots.h"
#include <sys/epoll.h>

#define SHAKE_SIZE 16
#define SHAKE_CMD 2
#define RESULT_SIZE 28
#define RESULT_CMD 3
#define GOT 14
#define NONE_LEFT 15
#define MAX_READ 65536
/* app.client.histogram: 8 linear sub-buckets per power of two, exact below 16 */
#define SUB_BITS 3
#define SUB (1 << SUB_BITS)
#define LINEAR (SUB * 2)

static PyTypeObject *conn_type = NULL, *session_type = NULL;
static PyObject *open_phase = NULL, *zero_float = NULL, *one = NULL;
static long ready_state = -1;
static Py_ssize_t off_userid, off_fd, off_state, off_out, off_session, off_sent_at, off_asks,
    off_asked, off_phase, off_buf;

static PyObject *
bind_records(PyObject *self, PyObject *args)
{
    PyObject *ctype, *stype, *phase;
    long ready;
    if (!PyArg_ParseTuple(args, "O!O!Ol", &PyType_Type, &ctype, &PyType_Type, &stype, &phase,
                          &ready))
        return NULL;
    const char *cnames[8] = {"userid", "fd", "state", "out", "session", "sent_at", "asks",
                             "asked"};
    Py_ssize_t *coffs[8] = {&off_userid, &off_fd, &off_state, &off_out, &off_session,
                            &off_sent_at, &off_asks, &off_asked};
    for (int i = 0; i < 8; i++) {
        Py_ssize_t off = slot_offset((PyTypeObject *)ctype, cnames[i]);
        if (off < 0)
            return NULL;
        *coffs[i] = off;
    }
    if ((off_phase = slot_offset((PyTypeObject *)stype, "phase")) < 0
        || (off_buf = slot_offset((PyTypeObject *)stype, "_buf")) < 0)
        return NULL;
    Py_INCREF(ctype);
    Py_XSETREF(conn_type, (PyTypeObject *)ctype);
    Py_INCREF(stype);
    Py_XSETREF(session_type, (PyTypeObject *)stype);
    Py_INCREF(phase);
    Py_XSETREF(open_phase, phase);
    ready_state = ready;
    Py_RETURN_NONE;
}

/* conn.state as a C long; -2 (never a state) when it is not an int. */
static long
state_of(PyObject *conn)
{
    PyObject *v = SLOT(conn, off_state);
    if (v == NULL || !PyLong_CheckExact(v))
        return -2;
    long s = PyLong_AsLong(v);
    if (s == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -2;
    }
    return s;
}

/* Truth of conn.sent_at (a float; 0.0 = nothing unanswered); -1 on error. */
static int
unanswered(PyObject *conn)
{
    PyObject *v = SLOT(conn, off_sent_at);
    if (v == NULL)
        return 0;
    if (PyFloat_CheckExact(v))
        return PyFloat_AS_DOUBLE(v) != 0.0;
    return PyObject_IsTrue(v);
}

static int
check_record(PyObject *conn)
{
    if (Py_TYPE(conn) != conn_type || SLOT(conn, off_userid) == NULL || SLOT(conn, off_fd) == NULL
        || SLOT(conn, off_out) == NULL || SLOT(conn, off_asks) == NULL) {
        PyErr_SetString(PyExc_TypeError, "conns must be bound connection records");
        return -1;
    }
    return 0;
}

static PyObject *
send_shakes(PyObject *self, PyObject *args)
{
    PyObject *conns, *nowobj, *send;
    unsigned long long second;
    Py_ssize_t cap, outstanding;
    if (!PyArg_ParseTuple(args, "O!KO!nnO", &PyList_Type, &conns, &second, &PyFloat_Type,
                          &nowobj, &cap, &outstanding, &send))
        return NULL;
    if (conn_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() the connection class first");
        return NULL;
    }
    PyObject *secondobj = PyLong_FromUnsignedLongLong(second);
    if (secondobj == NULL)
        return NULL;
    Py_ssize_t sent = 0, skipped = 0, busy = 0;
    unsigned char frame[SHAKE_SIZE];
    put_u16(frame, SHAKE_SIZE);
    put_u16(frame + 2, SHAKE_CMD);
    put_u64(frame + 4, (uint64_t)second);
    /* iterate over a copy of the references: send() may run Python code */
    Py_ssize_t count = PyList_GET_SIZE(conns);
    for (Py_ssize_t i = 0; i < count && i < PyList_GET_SIZE(conns); i++) {
        PyObject *conn = PyList_GET_ITEM(conns, i);
        if (check_record(conn) < 0)
            goto fail;
        if (state_of(conn) != ready_state) {
            skipped++;
            continue;
        }
        int waiting = unanswered(conn);
        if (waiting < 0)
            goto fail;
        if (waiting || outstanding >= cap) {
            busy++;
            continue;
        }
        put_u32(frame + 12, (uint32_t)PyLong_AsUnsignedLongMask(SLOT(conn, off_userid)));
        double at = wall_clock();  /* this request's send time, not the tick's */
        Py_ssize_t done = -1;
        if (slot_empty_bytes(conn, off_out)) {
            long fd = PyLong_AsLong(SLOT(conn, off_fd));
            if (fd == -1 && PyErr_Occurred())
                goto fail;
            done = write_fd((int)fd, (const char *)frame, SHAKE_SIZE);
        }
        if (done != SHAKE_SIZE) {
            Py_ssize_t from = done > 0 ? done : 0;
            PyObject *rest = PyBytes_FromStringAndSize((const char *)frame + from,
                                                       SHAKE_SIZE - from);
            if (rest == NULL)
                goto fail;
            Py_INCREF(conn);  /* send() may drop the record from every list */
            PyObject *r = PyObject_CallFunctionObjArgs(send, conn, rest, nowobj, NULL);
            Py_DECREF(rest);
            if (r == NULL) {
                Py_DECREF(conn);
                goto fail;
            }
            Py_DECREF(r);
            int still = state_of(conn) == ready_state;
            Py_DECREF(conn);
            if (!still) {
                skipped++;  /* the write found the connection gone */
                continue;
            }
        }
        PyObject *atobj = PyFloat_FromDouble(at);
        if (atobj == NULL)
            goto fail;
        slot_steal(conn, off_sent_at, atobj);
        outstanding++;
        PyObject *asks = PyNumber_Add(SLOT(conn, off_asks), one);
        if (asks == NULL)
            goto fail;
        slot_steal(conn, off_asks, asks);
        slot_set(conn, off_asked, secondobj);
        sent++;
    }
    Py_DECREF(secondobj);
    return Py_BuildValue("(nnnn)", sent, skipped, busy, outstanding);
fail:
    Py_DECREF(secondobj);
    return NULL;
}

static int
plain(PyObject *conn, long mask)
{
    if (Py_TYPE(conn) != conn_type || mask != EPOLLIN || state_of(conn) != ready_state
        || !slot_empty_bytes(conn, off_out) || SLOT(conn, off_sent_at) == NULL)
        return 0;
    PyObject *session = SLOT(conn, off_session);
    return session != NULL && Py_TYPE(session) == session_type
        && SLOT(session, off_phase) == open_phase && slot_empty_bytes(session, off_buf);
}

static int
only_results(const unsigned char *buf, Py_ssize_t n)
{
    if (n == 0 || n % RESULT_SIZE)
        return 0;
    for (Py_ssize_t at = 0; at < n; at += RESULT_SIZE)
        if (get_u16(buf + at) != RESULT_SIZE || get_u16(buf + at + 2) != RESULT_CMD)
            return 0;
    return 1;
}

static long long
bucket(long long us)
{
    if (us < LINEAR)
        return us > 0 ? us : 0;
    int bits = 64 - __builtin_clzll((unsigned long long)us);
    int shift = bits - SUB_BITS - 1;
    return SUB + (long long)shift * SUB + ((us >> shift) & (SUB - 1));
}

/* d[key] = d.get(key, 0) + n for C integers. */
static int
count_add(PyObject *d, long long key, Py_ssize_t n)
{
    PyObject *k = PyLong_FromLongLong(key);
    if (k == NULL)
        return -1;
    PyObject *old = PyDict_GetItemWithError(d, k);
    PyObject *v;
    if (old == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(k);
            return -1;
        }
        v = PyLong_FromSsize_t(n);
    } else if (n == 1) {
        v = PyNumber_Add(old, one);
    } else {
        PyObject *more = PyLong_FromSsize_t(n);
        v = more == NULL ? NULL : PyNumber_Add(old, more);
        Py_XDECREF(more);
    }
    int rc = v == NULL ? -1 : PyDict_SetItem(d, k, v);
    Py_XDECREF(v);
    Py_DECREF(k);
    return rc;
}

static int
count_in(PyObject *d, long long key)
{
    return count_add(d, key, 1);
}

/* A batch's counts kept in C and added to the dicts once, at its end: each
 * answer used to cost four dict updates (a new int key, a lookup, an add, a
 * store); a batch of answers from one tick has one arrival second and a few
 * result codes and latency buckets. */
#define TALLY_KEYS 512
struct tally { Py_ssize_t n[TALLY_KEYS]; int touched[TALLY_KEYS], ntouched; };

static int
tally_in(struct tally *t, PyObject *d, long long key)
{
    if (key < 0 || key >= TALLY_KEYS)
        return count_in(d, key);
    if (!t->n[key]++)
        t->touched[t->ntouched++] = (int)key;
    return 0;
}

static void
tally_reset(struct tally *t)
{
    for (int i = 0; i < t->ntouched; i++)
        t->n[t->touched[i]] = 0;
    t->ntouched = 0;
}

static int
tally_flush(struct tally *t, PyObject *d)
{
    for (int i = 0; i < t->ntouched; i++) {
        int key = t->touched[i];
        if (count_add(d, key, t->n[key]) < 0)
            return -1;
        t->n[key] = 0;
    }
    t->ntouched = 0;
    return 0;
}

/* Per-second counts of a batch: runs of one second added at once. */
struct run { long long second; Py_ssize_t n; };

static int
run_add(struct run *r, PyObject *d, long long second, Py_ssize_t n)
{
    if (r->n && r->second != second) {
        if (count_add(d, r->second, r->n) < 0)
            return -1;
        r->n = 0;
    }
    r->second = second;
    r->n += n;
    return 0;
}

static int
run_flush(struct run *r, PyObject *d)
{
    int rc = r->n ? count_add(d, r->second, r->n) : 0;
    r->n = 0;
    return rc;
}

static PyObject *
read_answers(PyObject *self, PyObject *args)
{
    PyObject *events, *by_fd, *hist, *results, *by_second, *served;
    Py_ssize_t size;
    double now;
    if (!PyArg_ParseTuple(args, "O!O!ndOO!O!O!", &PyList_Type, &events, &PyDict_Type, &by_fd,
                          &size, &now, &hist, &PyDict_Type, &results, &PyDict_Type, &by_second,
                          &PyDict_Type, &served))
        return NULL;
    if (conn_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() the connection class first");
        return NULL;
    }
    if (size <= 0 || size > MAX_READ) {
        PyErr_SetString(PyExc_ValueError, "read size out of range");
        return NULL;
    }
    PyObject *counts = PyObject_GetAttrString(hist, "counts");
    if (counts == NULL)
        return NULL;
    if (!PyDict_Check(counts)) {
        Py_DECREF(counts);
        PyErr_SetString(PyExc_TypeError, "hist.counts must be a dict");
        return NULL;
    }
    unsigned char buf[MAX_READ];
    Py_ssize_t answered = 0, released = 0;
    long long amount = 0;
    static struct tally codes, latencies;  /* zero between calls (flushed, or reset) */
    struct run arrivals = {0, 0}, useful_by = {0, 0};
    PyObject *rest = PyList_New(0), *got = PyList_New(0);
    if (rest == NULL || got == NULL)
        goto fail;
    Py_ssize_t count = PyList_GET_SIZE(events);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *conn;
        Py_ssize_t n;
        double arrived;
        int what = read_plain(PyList_GET_ITEM(events, i), by_fd, plain, rest, got, buf, size,
                              &conn, &n, &arrived);
        if (what == EVENT_ERROR)
            goto fail;
        if (what != EVENT_DATA)
            continue;
        if (!only_results(buf, n)) {
            if (append_read(got, conn, buf, n) < 0)
                goto fail;
            continue;
        }
        if (arrived <= 0.0)
            arrived = now;  /* a socket that does not stamp: when we read it */
        if (run_add(&arrivals, by_second, (long long)arrived, n / RESULT_SIZE) < 0)
            goto fail;
        Py_ssize_t useful = 0;  /* answers that served the request: GOT, NONE_LEFT */
        for (Py_ssize_t at = 0; at < n; at += RESULT_SIZE) {
            uint32_t result = get_u32(buf + at + 16);
            answered++;
            if (result == GOT || result == NONE_LEFT)
                useful++;
            if (tally_in(&codes, results, result) < 0)
                goto fail;
            if (result == GOT)
                amount += get_u32(buf + at + 24);
            int waiting = unanswered(conn);
            if (waiting < 0)
                goto fail;
            if (waiting) {
                double sent_at = PyFloat_AsDouble(SLOT(conn, off_sent_at));
                if (sent_at == -1.0 && PyErr_Occurred())
                    goto fail;
                if (tally_in(&latencies, counts,
                             bucket((long long)((arrived - sent_at) * 1e6))) < 0)
                    goto fail;
                slot_set(conn, off_sent_at, zero_float);
                released++;
            }
        }
        if (useful && run_add(&useful_by, served, (long long)arrived, useful) < 0)
            goto fail;
    }
    if (run_flush(&arrivals, by_second) < 0 || run_flush(&useful_by, served) < 0
        || tally_flush(&codes, results) < 0 || tally_flush(&latencies, counts) < 0)
        goto fail;
    if (released) {  /* Histogram.record's other half: its total */
        PyObject *total = PyObject_GetAttrString(hist, "total");
        PyObject *more = total == NULL ? NULL : PyLong_FromSsize_t(released);
        PyObject *sum = more == NULL ? NULL : PyNumber_Add(total, more);
        Py_XDECREF(total);
        Py_XDECREF(more);
        if (sum == NULL || PyObject_SetAttrString(hist, "total", sum) < 0) {
            Py_XDECREF(sum);
            goto fail;
        }
        Py_DECREF(sum);
    }
    Py_DECREF(counts);
    return Py_BuildValue("(NNnLn)", rest, got, answered, amount, released);
fail:
    tally_reset(&codes);
    tally_reset(&latencies);
    Py_DECREF(counts);
    Py_XDECREF(rest);
    Py_XDECREF(got);
    return NULL;
}

static PyMethodDef methods[] = {
    {"bind", bind_records, METH_VARARGS,
     "bind(conn_type, session_type, open_phase, ready): the records of the fast path"},
    {"send_shakes", send_shakes, METH_VARARGS,
     "send_shakes(conns, second, now, cap, outstanding, send) -> (sent, skipped, busy, "
     "outstanding)"},
    {"read_answers", read_answers, METH_VARARGS,
     "read_answers(events, by_fd, size, now, hist, results, by_second, served) -> (rest, got, "
     "answered, "
     "amount, released)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "app.client._fastclient",
    "Compiled twin of app.client.fastpath (the reference).", -1, methods,
};

PyMODINIT_FUNC
PyInit__fastclient(void)
{
    zero_float = PyFloat_FromDouble(0.0);
    one = PyLong_FromLong(1);
    if (zero_float == NULL || one == NULL)
        return NULL;
    return PyModule_Create(&module);
}
