/* The compiled hot paths' access to a Python class's __slots__, and the errnos they share.
 *
 * Why slots by offset: the connection records stay ordinary Python classes
 * (the pure-Python path and every slow path use them unchanged); the C code
 * reads and writes the same slots directly, as CPython's own member
 * descriptors do, without a Python-level attribute lookup per request.
 * ``slot_offset`` checks that each name is a plain object slot of the class;
 * callers then accept only objects of exactly that class.
 */
#ifndef HONGBAO_HOTSLOTS_H
#define HONGBAO_HOTSLOTS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* The wall clock in seconds, as time.time() reads it. */
static double
wall_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The offset of slot ``name`` in instances of ``type``; -1 with an exception set. */
static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyObject_GetAttrString((PyObject *)type, name);
    if (descr == NULL)
        return -1;
    if (Py_TYPE(descr) != &PyMemberDescr_Type) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ member", type->tp_name, name);
        Py_DECREF(descr);
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    Py_ssize_t offset = member->offset;
    int kind = member->type;
    Py_DECREF(descr);
    if (kind != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", type->tp_name, name);
        return -1;
    }
    return offset;
}

/* Replace a slot's value (a new reference to ``value`` is stored). */
static inline void
slot_set(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject *old = SLOT(obj, off);
    Py_INCREF(value);
    SLOT(obj, off) = value;
    Py_XDECREF(old);
}

/* Replace a slot's value, stealing the reference to ``value``. */
static inline void
slot_steal(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject *old = SLOT(obj, off);
    SLOT(obj, off) = value;
    Py_XDECREF(old);
}

/* A set slot holding an empty bytes object (unset counts as not empty: slow path). */
static inline int
slot_empty_bytes(PyObject *obj, Py_ssize_t off)
{
    PyObject *v = SLOT(obj, off);
    return v != NULL && PyBytes_CheckExact(v) && PyBytes_GET_SIZE(v) == 0;
}

/* The errnos that mean "the peer is gone" (app.reactor.GONE). */
static inline int
peer_gone(int err)
{
    switch (err) {
    case ECONNRESET: case EPIPE: case ENOTCONN: case ETIMEDOUT:
    case EHOSTUNREACH: case ECONNREFUSED: case EBADF:
        return 1;
    default:
        return 0;
    }
}

/* read(2) retried on EINTR. */
static inline Py_ssize_t
read_fd(int fd, char *buf, size_t size)
{
    Py_ssize_t n;
    do {
        n = read(fd, buf, size);
    } while (n < 0 && errno == EINTR);
    return n;
}

/* recvmsg(2) retried on EINTR; *arrived is the kernel's receive time of what
 * was read (s since the epoch), or 0.0 when the socket does not stamp. A
 * socket with SO_TIMESTAMPNS set stamps (app.client.worker sets it;
 * app.reactor.read_stamped is the Python twin). */
static inline Py_ssize_t
read_fd_stamped(int fd, char *buf, size_t size, double *arrived)
{
    char control[CMSG_SPACE(sizeof(struct timespec))];
    struct iovec iov = {buf, size};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    Py_ssize_t n;
    do {
        n = recvmsg(fd, &msg, 0);
    } while (n < 0 && errno == EINTR);
    *arrived = 0.0;
    if (n <= 0)
        return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            *arrived = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        }
    }
    return n;
}

/* write(2) retried on EINTR. */
static inline Py_ssize_t
write_fd(int fd, const char *buf, size_t size)
{
    Py_ssize_t n;
    do {
        n = write(fd, buf, size);
    } while (n < 0 && errno == EINTR);
    return n;
}

static inline uint16_t get_u16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t get_u32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t get_u64(const unsigned char *p)
{
    return ((uint64_t)get_u32(p) << 32) | get_u32(p + 4);
}
static inline void put_u16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
static inline void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = (v >> 16) & 0xff; p[2] = (v >> 8) & 0xff; p[3] = v & 0xff;
}
static inline void put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)(v >> 32));
    put_u32(p + 4, (uint32_t)v);
}

/* Append, stealing ``item``; -1 on error. */
static inline int
append_steal(PyObject *list, PyObject *item)
{
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* What one event of a batch came to (read_plain). */
enum { EVENT_ERROR = -1, EVENT_REST, EVENT_EMPTY, EVENT_DATA };

/* One ready event of a batch, the way both hot paths read it (the Python
 * twin is app.reactor.plain_reads): an event whose record is not plain goes
 * to ``rest`` (EVENT_REST); a plain one is read into ``buf``; a peer gone is
 * appended to ``got`` as (conn, None) (EVENT_EMPTY, as is a read with nothing
 * there); otherwise ``*conn`` and ``*n`` say what was read (EVENT_DATA).
 * With ``arrived`` (the client side) the read is stamped (read_fd_stamped). */
static int
read_plain(PyObject *event, PyObject *records, int (*plain)(PyObject *, long), PyObject *rest,
           PyObject *got, unsigned char *buf, Py_ssize_t size, PyObject **conn, Py_ssize_t *n,
           double *arrived)
{
    if (!PyTuple_Check(event) || PyTuple_GET_SIZE(event) != 2) {
        PyErr_SetString(PyExc_TypeError, "events are (fd, mask) pairs");
        return EVENT_ERROR;
    }
    PyObject *fdobj = PyTuple_GET_ITEM(event, 0);
    long mask = PyLong_AsLong(PyTuple_GET_ITEM(event, 1));
    if (mask == -1 && PyErr_Occurred())
        return EVENT_ERROR;
    PyObject *record = PyDict_GetItemWithError(records, fdobj);
    if (record == NULL && PyErr_Occurred())
        return EVENT_ERROR;
    if (record == NULL || !plain(record, mask))
        return PyList_Append(rest, event) < 0 ? EVENT_ERROR : EVENT_REST;
    long fd = PyLong_AsLong(fdobj);
    if (fd == -1 && PyErr_Occurred())
        return EVENT_ERROR;
    Py_ssize_t got_bytes = arrived == NULL
        ? read_fd((int)fd, (char *)buf, (size_t)size)
        : read_fd_stamped((int)fd, (char *)buf, (size_t)size, arrived);
    if (got_bytes < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return EVENT_EMPTY;
    if (got_bytes < 0 && !peer_gone(errno)) {
        PyErr_SetFromErrno(PyExc_OSError);
        return EVENT_ERROR;
    }
    if (got_bytes <= 0)
        return append_steal(got, Py_BuildValue("(OO)", record, Py_None)) < 0 ? EVENT_ERROR
                                                                              : EVENT_EMPTY;
    *conn = record;
    *n = got_bytes;
    return EVENT_DATA;
}

/* Append (conn, bytes of buf[0:n]) to ``got``; -1 on error. */
static int
append_read(PyObject *got, PyObject *conn, const unsigned char *buf, Py_ssize_t n)
{
    PyObject *data = PyBytes_FromStringAndSize((const char *)buf, n);
    if (data == NULL)
        return -1;
    return append_steal(got, Py_BuildValue("(ON)", conn, data));
}

#endif
