/* incfs._block_dirents: a directory's name block (docs/format.md, "Name
 * blocks") encoded as the fuse_dirent records READDIR answers with, in C.
 *
 * Optional: incfs/block_dirents.py has the same function in Python and uses
 * this one when it was built (`make setup`); tests compare the two. The
 * Python one makes an object per name and packs them with a format of five
 * fields per entry (~200 us for 1,000 names); this one writes the records
 * straight from the block (~10 us), which is most of what a cold walk of
 * many directories costs the daemon (docs/performance.md, "Cold walks").
 *
 * encode(block, count, types, low, high) -> (records, ends) or None
 *
 *   block  the bytes from the name block's start to the end of the names
 *          region: `count` 16-byte entries (u32 name_off from the block's
 *          start, u8 name_len, u8 d_type, 2 reserved, u64 child; little
 *          endian), then the names
 *   types  one d_type byte per entry, put in the records as they are
 *   records  fuse_dirent of each entry (native endian: the kernel's): u64
 *          ino (the child), u64 off (entry number + 1), u32 namelen, u32
 *          type, the name, zeros to a multiple of 8
 *   ends   count + 1 native u32: where each record starts, then the end of
 *          the last, in 8-byte units
 *
 * None when the block is not one this fast path lists: names not back to
 * back in entry order right after the table, or past the end of `block`,
 * a name that is empty, ".", "..", or holds '/' or NUL, names not strictly
 * ascending (bytewise), a child outside [low, high]. The caller then
 * decodes the block name by name, which lists what is valid and says what
 * is wrong; so this screen may refuse more than the checks do, never less.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TABLE_ENTRY 16 /* a name block's entry */
#define RECORD_HEAD 24 /* fuse_dirent before its name */

static uint64_t le(const unsigned char *p, int bytes)
{
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static int bad_name(const unsigned char *name, size_t len)
{
    if (len == 0 || (name[0] == '.' && (len == 1 || (len == 2 && name[1] == '.'))))
        return 1;
    return memchr(name, '/', len) != NULL || memchr(name, 0, len) != NULL;
}

/* strictly before, as Python compares bytes */
static int before(const unsigned char *a, size_t la, const unsigned char *b, size_t lb)
{
    int c = memcmp(a, b, la < lb ? la : lb);
    return c < 0 || (c == 0 && la < lb);
}

static size_t record_size(size_t len)
{
    return (RECORD_HEAD + len + 7) & ~(size_t)7;
}

/* The screen of the module comment; the records' total size, or 0 if refused. */
static size_t screen(const unsigned char *b, size_t blen, size_t count,
                     unsigned long long low, unsigned long long high)
{
    size_t pos = count * TABLE_ENTRY, total = 0;
    const unsigned char *prev = NULL;
    size_t prev_len = 0;
    for (size_t i = 0; i < count; i++) {
        const unsigned char *e = b + i * TABLE_ENTRY;
        size_t len = e[4];
        uint64_t child = le(e + 8, 8);
        if (le(e, 4) != pos || pos + len > blen || child < low || child > high)
            return 0;
        const unsigned char *name = b + pos;
        if (bad_name(name, len) || (prev != NULL && !before(prev, prev_len, name, len)))
            return 0;
        prev = name;
        prev_len = len;
        pos += len;
        total += record_size(len);
    }
    return total;
}

static void write_records(const unsigned char *b, size_t count, const unsigned char *types,
                          char *out, uint32_t *ends)
{
    size_t at = 0;
    ends[0] = 0;
    for (size_t i = 0; i < count; i++) {
        const unsigned char *e = b + i * TABLE_ENTRY;
        uint64_t ino = le(e + 8, 8), off = i + 1;
        uint32_t len = e[4], type = types[i];
        memcpy(out + at, &ino, 8);
        memcpy(out + at + 8, &off, 8);
        memcpy(out + at + 16, &len, 4);
        memcpy(out + at + 20, &type, 4);
        memcpy(out + at + RECORD_HEAD, b + le(e, 4), len);
        at += record_size(len);
        ends[i + 1] = (uint32_t)(at / 8);
    }
}

static PyObject *encode(PyObject *self, PyObject *args)
{
    Py_buffer block, types;
    Py_ssize_t count;
    unsigned long long low, high;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*ny*KK", &block, &count, &types, &low, &high))
        return NULL;
    if (count < 0 || types.len != count) {
        PyErr_SetString(PyExc_ValueError, "one type per entry");
        goto done;
    }
    if ((size_t)count > (size_t)block.len / TABLE_ENTRY) {
        result = Py_NewRef(Py_None); /* the table itself lies past the end */
        goto done;
    }
    size_t total = screen(block.buf, block.len, count, low, high);
    if (count > 0 && (total == 0 || total / 8 > UINT32_MAX)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *records = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    PyObject *ends = PyBytes_FromStringAndSize(NULL, (count + 1) * sizeof(uint32_t));
    if (records != NULL && ends != NULL) {
        memset(PyBytes_AS_STRING(records), 0, total); /* the names' padding */
        write_records(block.buf, count, types.buf, PyBytes_AS_STRING(records),
                      (uint32_t *)PyBytes_AS_STRING(ends));
        result = PyTuple_Pack(2, records, ends);
    }
    Py_XDECREF(records);
    Py_XDECREF(ends);
done:
    PyBuffer_Release(&block);
    PyBuffer_Release(&types);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(block, count, types, low, high) -> (records, ends) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "incfs._block_dirents",
    .m_doc = "A name block encoded as fuse_dirent records (see incfs.block_dirents).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__block_dirents(void)
{
    return PyModule_Create(&module);
}
