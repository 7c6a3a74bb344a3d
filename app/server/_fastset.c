/* app.server._fastset: the compiled twin of app.server.fastpath (read its docstring).
 *
 * Same three functions, same arguments, same results; the pure-Python module
 * is the reference and tests/test_fastpath.py runs both on the same input.
 */
#include "../hotslots.h"
#include <sys/epoll.h>

#define SHAKE_SIZE 16
#define SHAKE_CMD 2
#define RESULT_SIZE 28
#define RESULT_CMD 3
#define GOT 14
#define NONE_LEFT 15
#define OVERLOAD 17
#define MAX_READ 65536

static PyTypeObject *conn_type = NULL;
static PyObject *empty_bytes = NULL;
static PyObject *open_phase = NULL;
static Py_ssize_t off_userid, off_phase, off_buf, off_fd, off_out, off_blocked;

static PyObject *
bind_records(PyObject *self, PyObject *args)
{
    PyObject *type, *phase;
    if (!PyArg_ParseTuple(args, "O!O", &PyType_Type, &type, &phase))
        return NULL;
    PyTypeObject *t = (PyTypeObject *)type;
    Py_ssize_t offs[6];
    const char *names[6] = {"userid", "phase", "_buf", "fd", "out", "blocked"};
    for (int i = 0; i < 6; i++) {
        offs[i] = slot_offset(t, names[i]);
        if (offs[i] < 0)
            return NULL;
    }
    off_userid = offs[0]; off_phase = offs[1]; off_buf = offs[2];
    off_fd = offs[3]; off_out = offs[4]; off_blocked = offs[5];
    Py_INCREF(type);
    Py_XSETREF(conn_type, t);
    Py_INCREF(phase);
    Py_XSETREF(open_phase, phase);
    Py_RETURN_NONE;
}

static int
plain(PyObject *conn, long mask)
{
    return Py_TYPE(conn) == conn_type && mask == EPOLLIN && SLOT(conn, off_phase) == open_phase
        && slot_empty_bytes(conn, off_buf) && SLOT(conn, off_blocked) == Py_False
        && slot_empty_bytes(conn, off_out) && SLOT(conn, off_userid) != NULL;
}

/* 1 if buf[0:n] is only whole SHAKEs naming ``userid`` or 0. */
static int
only_shakes(const unsigned char *buf, Py_ssize_t n, uint32_t userid)
{
    if (n == 0 || n % SHAKE_SIZE)
        return 0;
    for (Py_ssize_t at = 0; at < n; at += SHAKE_SIZE) {
        const unsigned char *f = buf + at;
        uint32_t who = get_u32(f + 12);
        if (get_u16(f) != SHAKE_SIZE || get_u16(f + 2) != SHAKE_CMD || (who && who != userid))
            return 0;
    }
    return 1;
}

static PyObject *
read_shakes(PyObject *self, PyObject *args)
{
    PyObject *events, *conns;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "O!O!n", &PyList_Type, &events, &PyDict_Type, &conns, &size))
        return NULL;
    if (conn_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() the connection class first");
        return NULL;
    }
    if (size <= 0 || size > MAX_READ) {
        PyErr_SetString(PyExc_ValueError, "read size out of range");
        return NULL;
    }
    unsigned char buf[MAX_READ];
    PyObject *rest = PyList_New(0), *got = PyList_New(0);
    PyObject *shakers = PyList_New(0), *sents = PyList_New(0);
    if (!rest || !got || !shakers || !sents)
        goto fail;
    Py_ssize_t count = PyList_GET_SIZE(events);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *conn;
        Py_ssize_t n;
        int what = read_plain(PyList_GET_ITEM(events, i), conns, plain, rest, got, buf, size,
                              &conn, &n, NULL);
        if (what == EVENT_ERROR)
            goto fail;
        if (what != EVENT_DATA)
            continue;
        uint32_t userid = (uint32_t)PyLong_AsUnsignedLongMask(SLOT(conn, off_userid));
        if (!only_shakes(buf, n, userid)) {
            if (append_read(got, conn, buf, n) < 0)
                goto fail;
            continue;
        }
        for (Py_ssize_t at = 0; at < n; at += SHAKE_SIZE) {
            if (PyList_Append(shakers, conn) < 0
                || append_steal(sents, PyLong_FromUnsignedLongLong(get_u64(buf + at + 4))) < 0)
                goto fail;
        }
    }
    return Py_BuildValue("(NNNN)", rest, got, shakers, sents);
fail:
    Py_XDECREF(rest);
    Py_XDECREF(got);
    Py_XDECREF(shakers);
    Py_XDECREF(sents);
    return NULL;
}

static PyObject *
queue_results(PyObject *self, PyObject *args)
{
    PyObject *shakers, *granted, *dirty, *send;
    Py_ssize_t allowed;
    unsigned long long second;
    if (!PyArg_ParseTuple(args, "O!O!nKO!O", &PyList_Type, &shakers, &PyList_Type, &granted,
                          &allowed, &second, &PyList_Type, &dirty, &send))
        return NULL;
    if (conn_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() the connection class first");
        return NULL;
    }
    Py_ssize_t g = PyList_GET_SIZE(granted);
    Py_ssize_t count = PyList_GET_SIZE(shakers);
    unsigned char frame[RESULT_SIZE];
    put_u16(frame, RESULT_SIZE);
    put_u16(frame + 2, RESULT_CMD);
    put_u64(frame + 4, (uint64_t)second);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *conn = PyList_GET_ITEM(shakers, i);
        if (Py_TYPE(conn) != conn_type || SLOT(conn, off_userid) == NULL
            || SLOT(conn, off_out) == NULL || SLOT(conn, off_blocked) == NULL) {
            PyErr_SetString(PyExc_TypeError, "shakers must be bound connection records");
            return NULL;
        }
        uint32_t code = OVERLOAD, eid = 0, amount = 0;
        if (i < g) {
            PyObject *pair = PyList_GET_ITEM(granted, i);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyErr_SetString(PyExc_TypeError, "granted holds (envelope id, amount) pairs");
                return NULL;
            }
            code = GOT;
            eid = (uint32_t)PyLong_AsUnsignedLongMask(PyTuple_GET_ITEM(pair, 0));
            amount = (uint32_t)PyLong_AsUnsignedLongMask(PyTuple_GET_ITEM(pair, 1));
            if (PyErr_Occurred())
                return NULL;
        } else if (i < allowed) {
            code = NONE_LEFT;
        }
        put_u32(frame + 12, (uint32_t)PyLong_AsUnsignedLongMask(SLOT(conn, off_userid)));
        put_u32(frame + 16, code);
        put_u32(frame + 20, eid);
        put_u32(frame + 24, amount);
        PyObject *data = PyBytes_FromStringAndSize((const char *)frame, RESULT_SIZE);
        if (data == NULL)
            return NULL;
        if (slot_empty_bytes(conn, off_out)) {  /* Transport.send's first case, inlined */
            slot_steal(conn, off_out, data);
            if (SLOT(conn, off_blocked) == Py_False && PyList_Append(dirty, conn) < 0)
                return NULL;
            continue;
        }
        PyObject *r = PyObject_CallFunctionObjArgs(send, conn, data, NULL);
        Py_DECREF(data);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static PyObject *
write_out(PyObject *self, PyObject *args)
{
    PyObject *dirty, *conns;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &dirty, &PyDict_Type, &conns))
        return NULL;
    if (conn_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() the connection class first");
        return NULL;
    }
    PyObject *left = PyList_New(0);
    if (left == NULL)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(dirty);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *conn = PyList_GET_ITEM(dirty, i);
        if (Py_TYPE(conn) != conn_type || SLOT(conn, off_fd) == NULL
            || SLOT(conn, off_blocked) == NULL) {
            PyErr_SetString(PyExc_TypeError, "dirty must hold bound connection records");
            goto fail;
        }
        if (SLOT(conn, off_blocked) != Py_False)
            continue;
        PyObject *fdobj = SLOT(conn, off_fd);
        PyObject *open = PyDict_GetItemWithError(conns, fdobj);
        if (open != conn) {
            if (open == NULL && PyErr_Occurred())
                goto fail;
            continue;
        }
        PyObject *out = SLOT(conn, off_out);
        if (out == NULL || !PyBytes_CheckExact(out)) {
            PyErr_SetString(PyExc_TypeError, "a connection's out must be bytes");
            goto fail;
        }
        long fd = PyLong_AsLong(fdobj);
        if (fd == -1 && PyErr_Occurred())
            goto fail;
        Py_ssize_t size = PyBytes_GET_SIZE(out);
        Py_ssize_t n = write_fd((int)fd, PyBytes_AS_STRING(out), (size_t)size);
        if (n == size) {
            slot_set(conn, off_out, empty_bytes);
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            if (!peer_gone(errno)) {
                PyErr_SetFromErrno(PyExc_OSError);
                goto fail;
            }
            if (append_steal(left, Py_BuildValue("(OO)", conn, Py_None)) < 0)
                goto fail;
            continue;
        }
        if (n < 0)
            n = 0;
        PyObject *rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(out) + n, size - n);
        if (rest == NULL || append_steal(left, Py_BuildValue("(ON)", conn, rest)) < 0)
            goto fail;
    }
    return left;
fail:
    Py_DECREF(left);
    return NULL;
}

static PyMethodDef methods[] = {
    {"bind", bind_records, METH_VARARGS,
     "bind(conn_type, open_phase): the record class of the fast path"},
    {"read_shakes", read_shakes, METH_VARARGS,
     "read_shakes(events, conns, size) -> (rest, got, shakers, sents)"},
    {"queue_results", queue_results, METH_VARARGS,
     "queue_results(shakers, granted, allowed, second, dirty, send)"},
    {"write_out", write_out, METH_VARARGS, "write_out(dirty, conns) -> [(conn, rest or None)]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "app.server._fastset",
    "Compiled twin of app.server.fastpath (the reference).", -1, methods,
};

PyMODINIT_FUNC
PyInit__fastset(void)
{
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    if (empty_bytes == NULL)
        return NULL;
    return PyModule_Create(&module);
}
