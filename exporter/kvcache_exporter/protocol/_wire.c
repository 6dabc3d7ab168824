/* Compiled decode stage: msgpack KV-event payloads straight into columns.
 *
 * One Walker per PayloadDecoder. feed() walks one payload's bytes and appends one record per
 * event (and one folded hash per row) to C buffers; labels() hands the distinct label values
 * of the pending events to Python (in first-appearance order, so that LabelTable interns them
 * exactly as the reference does); flush() writes the EventBatch columns into bytearrays.
 * No Python object is made per event or per row.
 *
 * Semantics are those of kvcache_exporter.protocol.decode.PayloadDecoder (the reference): its
 * event-by-event ("loose") rules for unknown types, unknown fields and bad events, and its
 * strict typed decode's timing for events over the hash limit. Whatever this walker cannot
 * decide exactly it reports as UNSURE (feed returns -1, the payload's records rolled back) and
 * the Python side hands the payload to the reference: see compiled.py for the list.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define UNSURE (-1)
#define NOMEM (-2)
#define MAX_DEPTH 32
#define MAX_UNKNOWN_KEYS 32
#define MAX_SPECS 4096
#define RELEASE_GIL_BYTES (64 * 1024)

enum { OP_STORE = 0, OP_REMOVE = 1, OP_ACCESS = 2, OP_CLEAR = 3 };
enum { T_NIL, T_BOOL, T_UINT, T_INT, T_FLOAT, T_STR, T_BIN, T_ARR, T_MAP };

typedef struct {
    uint8_t t;
    uint32_t len;     /* str/bin bytes, array elements, map pairs */
    uint64_t u;       /* T_UINT value; T_INT: the int64 bits */
    double f;
    const uint8_t *data; /* str/bin bytes */
} Head;

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t be64(const uint8_t *p) {
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* One msgpack head; str/bin data is stepped over, containers' contents are not.
 * Ext types and reserved bytes are UNSURE (the reference decodes ext to objects). */
static inline __attribute__((always_inline)) int read_head(const uint8_t **pp, const uint8_t *end,
                                                           Head *h) {
    const uint8_t *p = *pp;
    if (p >= end) return UNSURE;
    uint8_t b = *p++;
    size_t need = 0;
    if (b <= 0x7f) { h->t = T_UINT; h->u = b; goto done; }
    if (b >= 0xe0) { h->t = T_INT; h->u = (uint64_t)(int64_t)(int8_t)b; goto done; }
    if ((b & 0xf0) == 0x80) { h->t = T_MAP; h->len = b & 0x0f; goto done; }
    if ((b & 0xf0) == 0x90) { h->t = T_ARR; h->len = b & 0x0f; goto done; }
    if ((b & 0xe0) == 0xa0) { h->t = T_STR; h->len = b & 0x1f; goto data; }
    switch (b) {
    case 0xc0: h->t = T_NIL; goto done;
    case 0xc2: case 0xc3: h->t = T_BOOL; h->u = b & 1; goto done;
    case 0xc4: case 0xd9:
        if (end - p < 1) return UNSURE;
        h->t = b == 0xc4 ? T_BIN : T_STR; h->len = p[0]; p += 1; goto data;
    case 0xc5: case 0xda:
        if (end - p < 2) return UNSURE;
        h->t = b == 0xc5 ? T_BIN : T_STR; h->len = be16(p); p += 2; goto data;
    case 0xc6: case 0xdb:
        if (end - p < 4) return UNSURE;
        h->t = b == 0xc6 ? T_BIN : T_STR; h->len = be32(p); p += 4; goto data;
    case 0xca: {
        if (end - p < 4) return UNSURE;
        uint32_t bits = be32(p); float f; memcpy(&f, &bits, 4);
        h->t = T_FLOAT; h->f = f; p += 4; goto done;
    }
    case 0xcb: {
        if (end - p < 8) return UNSURE;
        uint64_t bits = be64(p); double d; memcpy(&d, &bits, 8);
        h->t = T_FLOAT; h->f = d; p += 8; goto done;
    }
    case 0xcc: need = 1; break;
    case 0xcd: need = 2; break;
    case 0xce: need = 4; break;
    case 0xcf: need = 8; break;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        size_t n = (size_t)1 << (b - 0xd0);
        if ((size_t)(end - p) < n) return UNSURE;
        int64_t v = n == 1 ? (int8_t)p[0] : n == 2 ? (int16_t)be16(p)
                  : n == 4 ? (int32_t)be32(p) : (int64_t)be64(p);
        p += n;
        h->t = v < 0 ? T_INT : T_UINT; h->u = (uint64_t)v; goto done;
    }
    case 0xdc: if (end - p < 2) return UNSURE; h->t = T_ARR; h->len = be16(p); p += 2; goto done;
    case 0xdd: if (end - p < 4) return UNSURE; h->t = T_ARR; h->len = be32(p); p += 4; goto done;
    case 0xde: if (end - p < 2) return UNSURE; h->t = T_MAP; h->len = be16(p); p += 2; goto done;
    case 0xdf: if (end - p < 4) return UNSURE; h->t = T_MAP; h->len = be32(p); p += 4; goto done;
    default: return UNSURE; /* 0xc1, ext */
    }
    if ((size_t)(end - p) < need) return UNSURE;
    h->t = T_UINT;
    h->u = need == 1 ? p[0] : need == 2 ? be16(p) : need == 4 ? be32(p) : be64(p);
    p += need;
    goto done;
data:
    if ((size_t)(end - p) < h->len) return UNSURE;
    h->data = p; p += h->len;
done:
    *pp = p;
    return 0;
}

/* Strict UTF-8 (no overlongs, no surrogates, at most U+10FFFF), as Python decodes it. */
static int valid_utf8(const uint8_t *s, uint32_t n) {
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8) { /* ASCII, eight bytes at a time */
        uint64_t v;
        memcpy(&v, s + i, 8);
        if (v & 0x8080808080808080ULL) break;
    }
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) { i++; continue; }
        uint32_t k, cp;
        if (c >= 0xc2 && c <= 0xdf) { k = 1; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { k = 2; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { k = 3; cp = c & 0x07; }
        else return 0;
        if (n - i <= k) return 0;
        for (uint32_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if ((k == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (k == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* Bytes taken by a value that starts with this byte, for fixed-size scalars (0: others). */
static uint8_t SCALAR_SIZE[256];

static void init_scalar_sizes(void) {
    for (int b = 0; b < 0x80; b++) SCALAR_SIZE[b] = 1;
    for (int b = 0xe0; b < 0x100; b++) SCALAR_SIZE[b] = 1;
    SCALAR_SIZE[0xc0] = SCALAR_SIZE[0xc2] = SCALAR_SIZE[0xc3] = 1;
    SCALAR_SIZE[0xcc] = SCALAR_SIZE[0xd0] = 2;
    SCALAR_SIZE[0xcd] = SCALAR_SIZE[0xd1] = 3;
    SCALAR_SIZE[0xca] = SCALAR_SIZE[0xce] = SCALAR_SIZE[0xd2] = 5;
    SCALAR_SIZE[0xcb] = SCALAR_SIZE[0xcf] = SCALAR_SIZE[0xd3] = 9;
}

/* Step over one value, checking that the reference's generic decode would read it too:
 * valid UTF-8, scalar map keys, no ext, bounded depth. */
static int skip_value(const uint8_t **pp, const uint8_t *end, int depth) {
    Head h;
    if (depth > MAX_DEPTH || read_head(pp, end, &h)) return UNSURE;
    if (h.t == T_STR) return valid_utf8(h.data, h.len) ? 0 : UNSURE;
    if (h.t == T_ARR) {
        /* Arrays of numbers (token_ids) without a call per element. */
        const uint8_t *p = *pp;
        for (uint32_t i = 0; i < h.len;) {
            if (p >= end) return UNSURE;
            uint8_t b = *p;
            size_t n = SCALAR_SIZE[b];
            if (b < 0x80) { /* a run of small ints */
                do { p++; i++; } while (i < h.len && p < end && *p < 0x80);
            } else if (n) { /* a run of values with this head byte */
                do {
                    if ((size_t)(end - p) < n) return UNSURE;
                    p += n; i++;
                } while (i < h.len && p < end && *p == b);
            } else {
                *pp = p;
                if (skip_value(pp, end, depth + 1)) return UNSURE;
                p = *pp; i++;
            }
        }
        *pp = p;
    } else if (h.t == T_MAP) {
        for (uint32_t i = 0; i < h.len; i++) {
            Head k;
            if (read_head(pp, end, &k) || k.t == T_ARR || k.t == T_MAP) return UNSURE;
            if (k.t == T_STR && !valid_utf8(k.data, k.len)) return UNSURE;
            if (skip_value(pp, end, depth + 1)) return UNSURE;
        }
    }
    return 0;
}

/* --- growable buffers ------------------------------------------------------------------ */
typedef struct { char *p; size_t n, cap, size; } Buf;

static int buf_reserve(Buf *b, size_t more) {
    if (b->n + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->n + more) cap *= 2;
    char *p = PyMem_RawRealloc(b->p, cap * b->size);
    if (!p) return NOMEM;
    b->p = p; b->cap = cap;
    return 0;
}

/* --- label values: None, an int or a str, interned per flush --------------------------- */
enum { L_NONE = 0, L_INT = 1, L_STR = 2 };
typedef struct { uint8_t kind, neg; uint32_t len; uint64_t u; const uint8_t *s; } LVal;
typedef struct { uint8_t kind, neg; uint32_t len; uint64_t u; char *s; uint64_t hash; } LEntry;
typedef struct {
    LEntry *e; uint32_t n, cap;
    uint32_t *index; uint32_t icap; /* open addressing, entry id + 1, 0 empty */
    uint32_t last;                 /* last id found, checked first */
} LSet;

static uint64_t lval_hash(const LVal *v) {
    uint64_t h = 1469598103934665603ULL ^ (v->kind * 0x9e3779b97f4a7c15ULL) ^ v->neg;
    if (v->kind == L_STR) {
        for (uint32_t i = 0; i < v->len; i++) { h ^= v->s[i]; h *= 1099511628211ULL; }
    } else {
        h ^= v->u; h *= 0xff51afd7ed558ccdULL; h ^= h >> 33;
    }
    return h;
}

static inline int lval_eq(const LEntry *e, const LVal *v) {
    if (e->kind != v->kind) return 0;
    if (v->kind == L_STR) return e->len == v->len && !memcmp(e->s, v->s, v->len);
    return v->kind == L_NONE || (e->u == v->u && e->neg == v->neg);
}

static void lset_clear(LSet *s) {
    for (uint32_t i = 0; i < s->n; i++) PyMem_RawFree(s->e[i].s);
    s->n = 0; s->last = 0;
    if (s->index) memset(s->index, 0, s->icap * sizeof(uint32_t));
}

static void lset_free(LSet *s) {
    lset_clear(s);
    PyMem_RawFree(s->e); PyMem_RawFree(s->index);
    memset(s, 0, sizeof *s);
}

static void lset_place(LSet *s, uint32_t id) {
    uint32_t mask = s->icap - 1, i = (uint32_t)s->e[id].hash & mask;
    while (s->index[i]) i = (i + 1) & mask;
    s->index[i] = id + 1;
}

static int lset_rebuild(LSet *s, uint32_t icap) {
    uint32_t *index = PyMem_RawCalloc(icap, sizeof(uint32_t));
    if (!index) return NOMEM;
    PyMem_RawFree(s->index);
    s->index = index; s->icap = icap;
    for (uint32_t id = 0; id < s->n; id++) lset_place(s, id);
    return 0;
}

/* Forget the entries from id n on (a payload rolled back). */
static int lset_truncate(LSet *s, uint32_t n) {
    if (n >= s->n) return 0;
    for (uint32_t i = n; i < s->n; i++) PyMem_RawFree(s->e[i].s);
    s->n = n; s->last = 0;
    return s->icap ? lset_rebuild(s, s->icap) : 0;
}

static int64_t lset_intern(LSet *s, const LVal *v) {
    if (s->n && lval_eq(&s->e[s->last], v)) return s->last;
    uint64_t h = lval_hash(v);
    if (s->icap) {
        uint32_t mask = s->icap - 1, i = (uint32_t)h & mask;
        while (s->index[i]) {
            uint32_t id = s->index[i] - 1;
            if (s->e[id].hash == h && lval_eq(&s->e[id], v)) { s->last = id; return id; }
            i = (i + 1) & mask;
        }
    }
    if (s->n == UINT32_MAX - 1) return NOMEM;
    if (s->n == s->cap) {
        uint32_t cap = s->cap ? s->cap * 2 : 8;
        LEntry *e = PyMem_RawRealloc(s->e, cap * sizeof(LEntry));
        if (!e) return NOMEM;
        s->e = e; s->cap = cap;
    }
    LEntry *e = &s->e[s->n];
    e->kind = v->kind; e->neg = v->neg; e->u = v->u; e->len = v->len; e->hash = h; e->s = NULL;
    if (v->kind == L_STR) {
        e->s = PyMem_RawMalloc(v->len ? v->len : 1);
        if (!e->s) return NOMEM;
        memcpy(e->s, v->s, v->len);
    }
    uint32_t id = s->n++;
    if ((uint64_t)s->n * 2 > s->icap) {
        if (lset_rebuild(s, s->icap ? s->icap * 2 : 16)) { s->n--; PyMem_RawFree(e->s); return NOMEM; }
    } else {
        lset_place(s, id);
    }
    s->last = id;
    return id;
}

static PyObject *lentry_object(const LEntry *e) {
    if (e->kind == L_NONE) Py_RETURN_NONE;
    if (e->kind == L_INT)
        return e->neg ? PyLong_FromLongLong((long long)(int64_t)e->u)
                      : PyLong_FromUnsignedLongLong(e->u);
    return PyUnicode_DecodeUTF8(e->s, e->len, "strict");
}

/* --- events ---------------------------------------------------------------------------- */
typedef struct {
    double ts;
    uint64_t parent;
    uint64_t copies_start; /* into the copies buffer; UINT64_MAX: no usable copy counts */
    uint32_t n, sent;      /* rows (hashes), token_ids sent */
    uint32_t block_size;   /* 0 < size < 2**31, or 0: an equal share of the tokens sent */
    uint32_t medium, reason, group, adapter;
    uint8_t op, has_parent;
} Event;

typedef struct { uint32_t group, kind, window; } Spec;

enum { S_MEDIA, S_REASONS, S_GROUPS, S_ADAPTERS, S_KINDS, S_WINDOWS, N_SETS };

typedef struct {
    PyObject_HEAD
    Py_ssize_t max_events, max_hashes;
    Buf events, rows, copies, specs;
    LSet sets[N_SETS];
    Py_ssize_t pending_oversized; /* strict payloads' events over the hash limit (to flush) */
    /* what the last feed saw */
    double last_ts;
    int dp_kind; uint64_t dp_u;  /* 0: no int dp_rank, L_INT (+neg in dp_neg) */
    int dp_neg;
    Py_ssize_t unknown_events, unknown_fields, event_schema, too_large;
} Walker;

/* Per payload, while walking. */
typedef struct {
    int strict;   /* would the reference's typed decode take the whole payload? */
    int form;     /* T_MAP or T_ARR of the events so far, 0 before the first */
    Py_ssize_t kept, oversized, unknown_events, unknown_fields, event_schema;
} Walk;

/* Field ids: every name an event may carry. */
enum {
    F_TYPE, F_HASHES, F_PARENT, F_TOKENS, F_BLOCK_SIZE, F_LORA_ID, F_MEDIUM, F_LORA_NAME,
    F_EXTRA_KEYS, F_GROUP, F_SPEC_KIND, F_SPEC_WINDOW, F_CACHE_SALT, F_SESSION_ID, F_MM_KEYS,
    F_COPIES, F_REASON, N_FIELDS, F_PAD = N_FIELDS
};
static const char *const FIELD_NAMES[N_FIELDS] = {
    "type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
    "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window", "cache_salt", "session_id", "mm_keys",
    "remaining_copy_counts", "reason",
};
static const char *const TYPE_NAMES[4] = {
    "BlockStored", "BlockRemoved", "BlockAccessed", "AllBlocksCleared",
};
#define BIT(f) (1u << (f))
static const uint32_t ALLOWED[4] = {
    BIT(F_HASHES) | BIT(F_PARENT) | BIT(F_TOKENS) | BIT(F_BLOCK_SIZE) | BIT(F_LORA_ID) |
        BIT(F_MEDIUM) | BIT(F_LORA_NAME) | BIT(F_EXTRA_KEYS) | BIT(F_GROUP) | BIT(F_SPEC_KIND) |
        BIT(F_SPEC_WINDOW) | BIT(F_CACHE_SALT) | BIT(F_SESSION_ID) | BIT(F_MM_KEYS),
    BIT(F_HASHES) | BIT(F_MEDIUM) | BIT(F_GROUP) | BIT(F_COPIES) | BIT(F_REASON),
    BIT(F_HASHES) | BIT(F_MEDIUM) | BIT(F_GROUP),
    0,
};
/* Array form: the field at each position after the type name (vLLM's declaration order). */
static const uint8_t POSITIONS[4][12] = {
    {F_HASHES, F_PARENT, F_TOKENS, F_BLOCK_SIZE, F_LORA_ID, F_MEDIUM, F_LORA_NAME, F_EXTRA_KEYS,
     F_GROUP, F_SPEC_KIND, F_SPEC_WINDOW, F_PAD},
    {F_HASHES, F_MEDIUM, F_GROUP, F_COPIES, F_REASON},
    {F_HASHES, F_MEDIUM, F_GROUP},
    {0},
};
static const uint32_t WIDTH[4] = {12, 5, 3, 0};

static uint32_t TYPE_LEN[4];

static void init_names(void) {
    for (int op = 0; op < 4; op++) TYPE_LEN[op] = (uint32_t)strlen(TYPE_NAMES[op]);
}

/* The field a key names (-1: none): by length, then first letter, then all of it. */
static int field_id(const Head *k) {
    const uint8_t *d = k->data;
#define IS(f, n) (!memcmp(d, FIELD_NAMES[f], n) ? (f) : -1)
    switch (k->len) {
    case 4: return d[0] == 't' ? IS(F_TYPE, 4) : -1;
    case 6: return d[0] == 'm' ? IS(F_MEDIUM, 6) : d[0] == 'r' ? IS(F_REASON, 6) : -1;
    case 7: return d[0] == 'l' ? IS(F_LORA_ID, 7) : d[0] == 'm' ? IS(F_MM_KEYS, 7) : -1;
    case 9:
        return d[0] == 't' ? IS(F_TOKENS, 9) : d[0] == 'l' ? IS(F_LORA_NAME, 9)
             : d[0] == 'g' ? IS(F_GROUP, 9) : -1;
    case 10:
        return d[0] == 'b' ? IS(F_BLOCK_SIZE, 10) : d[0] == 'e' ? IS(F_EXTRA_KEYS, 10)
             : d[0] == 'c' ? IS(F_CACHE_SALT, 10) : d[0] == 's' ? IS(F_SESSION_ID, 10) : -1;
    case 12: return IS(F_HASHES, 12);
    case 17: return IS(F_PARENT, 17);
    case 18: return IS(F_SPEC_KIND, 18);
    case 21: return IS(F_COPIES, 21);
    case 28: return IS(F_SPEC_WINDOW, 28);
    default: return -1;
    }
#undef IS
}

static int type_of(const Head *h) {
    if (h->t != T_STR) return -1;
    for (int op = 0; op < 4; op++)
        if (h->len == TYPE_LEN[op] && !memcmp(h->data, TYPE_NAMES[op], h->len)) return op;
    return -1;
}

static inline int fold(const Head *h, uint64_t *out) {
    if (h->t == T_UINT || h->t == T_INT) { *out = h->u; return 1; }
    if (h->t == T_BIN) {
        uint32_t n = h->len < 8 ? h->len : 8;
        uint64_t v = 0;
        for (uint32_t i = h->len - n; i < h->len; i++) v = (v << 8) | h->data[i];
        *out = v;
        return 1;
    }
    return 0;
}

static inline void lval_of_int(const Head *h, LVal *v) {
    v->kind = L_INT; v->neg = h->t == T_INT; v->u = h->u; v->len = 0; v->s = NULL;
}

/* A str or None (1), a value of another type (0). */
static int str_or_none(const uint8_t *at, const uint8_t *end, LVal *v) {
    memset(v, 0, sizeof *v);
    if (!at) return 1;
    Head h;
    read_head(&at, end, &h);
    if (h.t == T_NIL) return 1;
    if (h.t != T_STR) return 0;
    v->kind = L_STR; v->s = h.data; v->len = h.len;
    return 1;
}

/* group_idx and the spec fields: None, int or str; any other value is UNSURE (the
 * reference maps it to "other" after deduplicating raw values, which this cannot mirror). */
static int label_value(const uint8_t *at, const uint8_t *end, LVal *v) {
    memset(v, 0, sizeof *v);
    if (!at) return 0;
    Head h;
    read_head(&at, end, &h);
    if (h.t == T_NIL) return 0;
    if (h.t == T_UINT || h.t == T_INT) { lval_of_int(&h, v); return 0; }
    if (h.t == T_STR) { v->kind = L_STR; v->s = h.data; v->len = h.len; return 0; }
    return UNSURE;
}

#define SCHEMA 1    /* the event is unreadable: counted as event_schema, skipped */
#define OVERSIZED 2 /* more hashes than the limit: counted as too_large, skipped */

static int record_fields(Walker *w, Walk *k, int op, int map_form, const uint8_t **fv,
                         const uint8_t *end, double ts) {
    Event ev;
    memset(&ev, 0, sizeof ev);
    ev.op = (uint8_t)op; ev.ts = ts; ev.copies_start = UINT64_MAX;
    Head h;
    LVal medium, reason, group, kind, window, adapter;
    memset(&medium, 0, sizeof medium);
    reason = group = kind = window = adapter = medium;
    if (op == OP_CLEAR) {
        if (buf_reserve(&w->rows, 1)) return NOMEM;
        ((uint64_t *)w->rows.p)[w->rows.n++] = 0;
        ev.n = 1;
        goto checked;
    }
    const uint8_t *at = fv[F_HASHES];
    if (!at) return SCHEMA;
    read_head(&at, end, &h);
    if (h.t != T_ARR) return SCHEMA;
    ev.n = h.len;
    if (buf_reserve(&w->rows, h.len)) return NOMEM;
    uint64_t *rows = (uint64_t *)w->rows.p + w->rows.n;
    for (uint32_t i = 0; i < ev.n; i++) {
        Head e;
        read_head(&at, end, &e);
        if (!fold(&e, &rows[i])) return SCHEMA;
    }
    w->rows.n += ev.n;
    int r;
    if ((r = label_value(fv[F_GROUP], end, &group))) return r;
    if (!str_or_none(fv[F_MEDIUM], end, &medium)) return SCHEMA;
    if (!str_or_none(fv[F_REASON], end, &reason)) return SCHEMA;
    if (op == OP_STORE) {
        if ((r = label_value(fv[F_SPEC_KIND], end, &kind))) return r;
        if ((r = label_value(fv[F_SPEC_WINDOW], end, &window))) return r;
        if ((at = fv[F_PARENT])) {
            read_head(&at, end, &h);
            if (h.t != T_NIL) {
                if (!fold(&h, &ev.parent)) return SCHEMA;
                ev.has_parent = 1;
            }
        }
        if ((at = fv[F_TOKENS])) {
            read_head(&at, end, &h);
            ev.sent = h.t == T_ARR ? h.len : 0;
        }
        if ((at = fv[F_BLOCK_SIZE])) {
            read_head(&at, end, &h);
            if (h.t == T_UINT) ev.block_size = h.u < (1ULL << 31) ? (uint32_t)h.u : 0;
            else if (h.t != T_NIL && h.t != T_INT) return SCHEMA;
        }
        LVal lora_id;
        memset(&lora_id, 0, sizeof lora_id);
        if ((at = fv[F_LORA_ID])) {
            read_head(&at, end, &h);
            if (h.t == T_UINT || h.t == T_INT) lval_of_int(&h, &lora_id);
            else if (h.t != T_NIL) return SCHEMA;
        }
        LVal name;
        memset(&name, 0, sizeof name);
        if ((at = fv[F_LORA_NAME])) {
            const uint8_t *p = at;
            read_head(&p, end, &h);
            if (h.t == T_STR) { name.kind = L_STR; name.s = h.data; name.len = h.len; }
            else if (map_form && h.t != T_NIL) return SCHEMA; /* the array form takes Any */
        }
        adapter = name.kind == L_STR && name.len ? name : lora_id;
    }
    if (op == OP_REMOVE && (at = fv[F_COPIES])) {
        read_head(&at, end, &h);
        if (h.t == T_ARR) {
            if (buf_reserve(&w->copies, h.len)) return NOMEM;
            int32_t *out = (int32_t *)w->copies.p + w->copies.n;
            for (uint32_t i = 0; i < h.len; i++) {
                Head e;
                read_head(&at, end, &e);
                if (e.t == T_INT) out[i] = 0;
                else if (e.t == T_UINT) out[i] = e.u > INT32_MAX ? INT32_MAX : (int32_t)e.u;
                else return SCHEMA;
            }
            /* A list that does not match the hashes one to one says nothing usable. */
            if (h.len == ev.n) { ev.copies_start = w->copies.n; w->copies.n += h.len; }
        } else if (h.t != T_NIL) {
            return SCHEMA;
        }
    }
checked:
    if ((Py_ssize_t)ev.n > w->max_hashes) {
        k->oversized++;
        return OVERSIZED;
    }
    int64_t id;
    if ((id = lset_intern(&w->sets[S_MEDIA], &medium)) < 0) return NOMEM;
    ev.medium = (uint32_t)id;
    if ((id = lset_intern(&w->sets[S_REASONS], &reason)) < 0) return NOMEM;
    ev.reason = (uint32_t)id;
    if ((id = lset_intern(&w->sets[S_GROUPS], &group)) < 0) return NOMEM;
    ev.group = (uint32_t)id;
    if ((id = lset_intern(&w->sets[S_ADAPTERS], &adapter)) < 0) return NOMEM;
    ev.adapter = (uint32_t)id;
    if (op == OP_STORE && (kind.kind != L_NONE || window.kind != L_NONE)) {
        Spec s;
        s.group = ev.group;
        if ((id = lset_intern(&w->sets[S_KINDS], &kind)) < 0) return NOMEM;
        s.kind = (uint32_t)id;
        if ((id = lset_intern(&w->sets[S_WINDOWS], &window)) < 0) return NOMEM;
        s.window = (uint32_t)id;
        Spec *specs = (Spec *)w->specs.p;
        size_t i = w->specs.n;
        while (i > 0 && !(specs[i - 1].group == s.group && specs[i - 1].kind == s.kind &&
                          specs[i - 1].window == s.window))
            i--;
        if (i == 0) {
            if (w->specs.n >= MAX_SPECS) return UNSURE;
            if (buf_reserve(&w->specs, 1)) return NOMEM;
            ((Spec *)w->specs.p)[w->specs.n++] = s;
        }
    }
    if (buf_reserve(&w->events, 1)) return NOMEM;
    ((Event *)w->events.p)[w->events.n++] = ev;
    k->kept++;
    return 0;
}

/* Read a known event's fields (values already validated by skip_value) and record it; an
 * unreadable or oversized event leaves no rows behind. */
static int record(Walker *w, Walk *k, int op, int map_form, const uint8_t **fv,
                  const uint8_t *end, double ts) {
    size_t rows = w->rows.n, copies = w->copies.n;
    int r = record_fields(w, k, op, map_form, fv, end, ts);
    if (r) { w->rows.n = rows; w->copies.n = copies; }
    return r == OVERSIZED ? 0 : r;
}

/* One event: counted, skipped or recorded as the reference's event-by-event path would. */
static int walk_event(Walker *w, Walk *k, const uint8_t **pp, const uint8_t *end, double ts) {
    const uint8_t *start = *pp, *fv[N_FIELDS + 1] = {0};
    Head h;
    if (read_head(pp, end, &h)) return UNSURE;
    int form = h.t;
    if (form != T_MAP && form != T_ARR) {
        *pp = start;
        if (skip_value(pp, end, 0)) return UNSURE;
        k->strict = 0; k->event_schema++;
        return 0;
    }
    if (k->form && k->form != form) k->strict = 0;
    k->form = form;
    int op;
    if (form == T_MAP) {
        uint32_t seen = 0;
        Py_ssize_t foreign = 0; /* distinct keys this event's type does not know */
        const uint8_t *unknown[MAX_UNKNOWN_KEYS];
        uint32_t unknown_len[MAX_UNKNOWN_KEYS], n_unknown = 0;
        for (uint32_t i = 0; i < h.len; i++) {
            Head key;
            if (read_head(pp, end, &key) || key.t != T_STR) return UNSURE;
            int f = field_id(&key);
            if (f < 0 && !valid_utf8(key.data, key.len)) return UNSURE;
            if (f >= 0) {
                if (seen & BIT(f)) return UNSURE; /* a repeated key */
                seen |= BIT(f);
                fv[f] = *pp;
            } else {
                uint32_t j = 0;
                while (j < n_unknown && !(unknown_len[j] == key.len &&
                                          !memcmp(unknown[j], key.data, key.len)))
                    j++;
                if (j == n_unknown) {
                    if (n_unknown == MAX_UNKNOWN_KEYS) return UNSURE;
                    unknown[n_unknown] = key.data; unknown_len[n_unknown++] = key.len;
                }
            }
            if (skip_value(pp, end, 1)) return UNSURE;
        }
        op = -1;
        if (fv[F_TYPE]) {
            const uint8_t *at = fv[F_TYPE];
            Head t;
            read_head(&at, end, &t);
            op = type_of(&t);
        }
        if (op < 0) { k->strict = 0; k->unknown_events++; return 0; }
        uint32_t others = seen & ~ALLOWED[op] & ~BIT(F_TYPE);
        while (others) { foreign++; others &= others - 1; }
        foreign += n_unknown;
        if (foreign) { k->strict = 0; k->unknown_fields += foreign; }
        for (int f = 1; f < N_FIELDS; f++)
            if (!(ALLOWED[op] & BIT(f))) fv[f] = NULL;
    } else {
        if (h.len == 0) { k->strict = 0; k->event_schema++; return 0; }
        const uint8_t *name_at = *pp;
        Head t;
        if (read_head(&name_at, end, &t)) return UNSURE;
        if (skip_value(pp, end, 1)) return UNSURE;
        op = type_of(&t);
        uint32_t width = op < 0 ? 0 : WIDTH[op];
        if (h.len > 1 + width) k->strict = 0;
        for (uint32_t i = 1; i < h.len; i++) {
            const uint8_t *at = *pp;
            if (i <= width) fv[POSITIONS[op][i - 1]] = at;
            else if (*at != 0xc0) k->unknown_fields++; /* a non-null value past the known */
            if (skip_value(pp, end, 1)) return UNSURE;
        }
        if (op < 0) { k->strict = 0; k->unknown_events++; return 0; }
    }
    int r = record(w, k, op, form == T_MAP, fv, end, ts);
    if (r == SCHEMA) { k->strict = 0; k->event_schema++; return 0; }
    return r;
}

typedef struct {
    size_t events, rows, copies, specs;
    uint32_t sets[N_SETS];
} Mark;

static Mark mark_of(Walker *w) {
    Mark m = {w->events.n, w->rows.n, w->copies.n, w->specs.n, {0}};
    for (int i = 0; i < N_SETS; i++) m.sets[i] = w->sets[i].n;
    return m;
}

static int rollback(Walker *w, const Mark *m) {
    w->events.n = m->events; w->rows.n = m->rows; w->copies.n = m->copies; w->specs.n = m->specs;
    for (int i = 0; i < N_SETS; i++)
        if (lset_truncate(&w->sets[i], m->sets[i])) return NOMEM;
    return 0;
}

/* The whole payload: [ts, events, dp_rank?, ...]. */
static int walk_payload(Walker *w, Walk *k, const uint8_t *p, const uint8_t *end) {
    Head h, ts;
    if (read_head(&p, end, &h) || h.t != T_ARR || h.len < 2) return UNSURE;
    if (read_head(&p, end, &ts)) return UNSURE;
    double t;
    if (ts.t == T_FLOAT) t = ts.f;
    else if (ts.t == T_UINT) t = (double)ts.u;
    else if (ts.t == T_INT) t = (double)(int64_t)ts.u;
    else return UNSURE;
    if (!isfinite(t)) return UNSURE;
    Head events;
    if (read_head(&p, end, &events) || events.t != T_ARR) return UNSURE;
    if ((Py_ssize_t)events.len > w->max_events) return UNSURE;
    for (uint32_t i = 0; i < events.len; i++) {
        int r = walk_event(w, k, &p, end, t);
        if (r) return r;
    }
    w->dp_kind = 0;
    if (h.len >= 3) {
        const uint8_t *at = p;
        Head dp;
        if (read_head(&at, end, &dp)) return UNSURE;
        if (dp.t == T_UINT || dp.t == T_INT) {
            w->dp_kind = L_INT; w->dp_neg = dp.t == T_INT; w->dp_u = dp.u;
        } else if (dp.t != T_NIL) {
            k->strict = 0;
        }
        for (uint32_t i = 2; i < h.len; i++)
            if (skip_value(&p, end, 1)) return UNSURE;
    }
    if (p != end) return UNSURE; /* trailing bytes */
    w->last_ts = t;
    return 0;
}

static PyObject *Walker_feed(Walker *w, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE)) return NULL;
    const uint8_t *p = view.buf, *end = p + view.len;
    Mark m = mark_of(w);
    Walk k;
    memset(&k, 0, sizeof k);
    k.strict = 1;
    int r;
    if (view.len >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        r = walk_payload(w, &k, p, end);
        Py_END_ALLOW_THREADS
    } else {
        r = walk_payload(w, &k, p, end);
    }
    PyBuffer_Release(&view);
    if (r) {
        if (rollback(w, &m) || r == NOMEM) return PyErr_NoMemory();
        return PyLong_FromLong(-1);
    }
    /* The typed decode keeps events over the hash limit until the flush; event by event,
     * they are dropped at once. */
    Py_ssize_t fed;
    if (k.strict) {
        w->pending_oversized += k.oversized;
        w->unknown_events = w->unknown_fields = w->event_schema = w->too_large = 0;
        fed = k.kept + k.oversized;
    } else {
        w->unknown_events = k.unknown_events;
        w->unknown_fields = k.unknown_fields;
        w->event_schema = k.event_schema;
        w->too_large = k.oversized;
        fed = k.kept;
    }
    return PyLong_FromSsize_t(fed);
}

static void walker_reset(Walker *w) {
    w->events.n = w->rows.n = w->copies.n = w->specs.n = 0;
    for (int i = 0; i < N_SETS; i++) lset_clear(&w->sets[i]);
    w->pending_oversized = 0;
}

static PyObject *Walker_reset(Walker *w, PyObject *Py_UNUSED(ignored)) {
    walker_reset(w);
    Py_RETURN_NONE;
}

static PyObject *set_list(const LSet *s) {
    PyObject *out = PyList_New(s->n);
    if (!out) return NULL;
    for (uint32_t i = 0; i < s->n; i++) {
        PyObject *v = lentry_object(&s->e[i]);
        if (!v) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

/* (media, reasons, groups, adapters, specs): distinct label values of the pending events in
 * first-appearance order; specs as (group, kind, window) tuples. */
static PyObject *Walker_labels(Walker *w, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyTuple_New(5);
    if (!out) return NULL;
    for (int i = 0; i < 4; i++) {
        PyObject *l = set_list(&w->sets[i]);
        if (!l) { Py_DECREF(out); return NULL; }
        PyTuple_SET_ITEM(out, i, l);
    }
    PyObject *specs = PyList_New(w->specs.n);
    if (!specs) { Py_DECREF(out); return NULL; }
    PyTuple_SET_ITEM(out, 4, specs);
    for (size_t i = 0; i < w->specs.n; i++) {
        const Spec *s = (const Spec *)w->specs.p + i;
        PyObject *t = Py_BuildValue(
            "(NNN)", lentry_object(&w->sets[S_GROUPS].e[s->group]),
            lentry_object(&w->sets[S_KINDS].e[s->kind]),
            lentry_object(&w->sets[S_WINDOWS].e[s->window]));
        if (!t) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(specs, i, t);
    }
    return out;
}

static PyObject *column(size_t n, size_t size, char **data) {
    PyObject *b = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(n * size));
    if (b) *data = PyByteArray_AS_STRING(b);
    return b;
}

enum { C_OP, C_HASH, C_TS, C_MEDIUM, C_REASON, C_PARENT, C_HAS_PARENT, C_OFFSET, C_GROUP,
       C_ADAPTER, C_TOKENS, C_COPIES, N_COLUMNS };
static const size_t COLUMN_SIZE[N_COLUMNS] = {1, 8, 8, 1, 1, 8, 1, 4, 1, 1, 4, 4};

/* flush(media_ids, reason_ids, group_ids, adapter_ids) with the LabelTable id of each
 * distinct value labels() gave: (columns..., events per op, tokens, oversized); resets. */
static PyObject *Walker_flush(Walker *w, PyObject *args) {
    Py_buffer lut[4];
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &lut[0], &lut[1], &lut[2], &lut[3])) return NULL;
    PyObject *out = NULL, *cols[N_COLUMNS] = {0};
    char *d[N_COLUMNS];
    for (int i = 0; i < 4; i++)
        if ((size_t)lut[i].len < w->sets[i].n) {
            PyErr_SetString(PyExc_ValueError, "a label id table is shorter than its labels");
            goto done;
        }
    size_t n = w->rows.n;
    for (int c = 0; c < N_COLUMNS; c++)
        if (!(cols[c] = column(n, COLUMN_SIZE[c], &d[c]))) goto done;
    const uint8_t *lm = lut[0].buf, *lr = lut[1].buf, *lg = lut[2].buf, *la = lut[3].buf;
    memcpy(d[C_HASH], w->rows.p, n * 8);
    long long per_op[4] = {0, 0, 0, 0};
    unsigned long long tokens_total = 0;
    size_t row = 0;
    const Event *ev = (const Event *)w->events.p;
    const int32_t *copies = (const int32_t *)w->copies.p;
    double *ts = (double *)d[C_TS];
    uint64_t *parent = (uint64_t *)d[C_PARENT];
    uint32_t *offset = (uint32_t *)d[C_OFFSET], *tokens = (uint32_t *)d[C_TOKENS];
    int32_t *left = (int32_t *)d[C_COPIES];
    for (size_t e = 0; e < w->events.n; e++, ev++) {
        per_op[ev->op]++;
        uint32_t cnt = ev->n;
        uint8_t medium = lm[ev->medium], reason = lr[ev->reason], group = lg[ev->group];
        uint8_t adapter = ev->op == OP_STORE ? la[ev->adapter] : 0;
        /* Tokens each stored block holds: block_size, fewer only for a trailing partial
         * block; an equal share of token_ids without a usable block_size. */
        int64_t size = ev->block_size ? ev->block_size
                                      : (cnt ? ((int64_t)ev->sent + cnt - 1) / cnt : 0);
        for (uint32_t i = 0; i < cnt; i++) {
            size_t r = row + i;
            d[C_OP][r] = (char)ev->op;
            d[C_MEDIUM][r] = (char)medium;
            d[C_REASON][r] = (char)reason;
            d[C_GROUP][r] = (char)group;
            d[C_ADAPTER][r] = (char)adapter;
            d[C_HAS_PARENT][r] = (char)ev->has_parent;
            ts[r] = ev->ts;
            parent[r] = ev->parent;
            offset[r] = i;
            uint32_t held = 0;
            if (ev->op == OP_STORE) {
                int64_t rest = (int64_t)ev->sent - (int64_t)i * size;
                held = rest <= 0 ? 0 : (uint32_t)(rest < size ? rest : size);
                tokens_total += held;
            }
            tokens[r] = held;
            left[r] = ev->copies_start == UINT64_MAX ? -1 : copies[ev->copies_start + i];
        }
        row += cnt;
    }
    out = Py_BuildValue("(NNNNNNNNNNNN(LLLL)Kn)", cols[0], cols[1], cols[2], cols[3], cols[4],
                        cols[5], cols[6], cols[7], cols[8], cols[9], cols[10], cols[11],
                        per_op[0], per_op[1], per_op[2], per_op[3], tokens_total,
                        w->pending_oversized);
    memset(cols, 0, sizeof cols); /* N: the tuple owns them, or they are gone */
    if (out) walker_reset(w);
done:
    for (int c = 0; c < N_COLUMNS; c++) Py_XDECREF(cols[c]);
    for (int i = 0; i < 4; i++) PyBuffer_Release(&lut[i]);
    return out;
}

static PyObject *Walker_get_pending(Walker *w, void *Py_UNUSED(c)) {
    return PyLong_FromSsize_t((Py_ssize_t)w->events.n + w->pending_oversized);
}
static PyObject *Walker_get_events(Walker *w, void *Py_UNUSED(c)) {
    return PyLong_FromSize_t(w->events.n);
}
static PyObject *Walker_get_rows(Walker *w, void *Py_UNUSED(c)) {
    return PyLong_FromSize_t(w->rows.n);
}
static PyObject *Walker_get_last_ts(Walker *w, void *Py_UNUSED(c)) {
    return PyFloat_FromDouble(w->last_ts);
}
static PyObject *Walker_get_dp_rank(Walker *w, void *Py_UNUSED(c)) {
    if (!w->dp_kind) Py_RETURN_NONE;
    return w->dp_neg ? PyLong_FromLongLong((long long)(int64_t)w->dp_u)
                     : PyLong_FromUnsignedLongLong(w->dp_u);
}
static PyObject *Walker_get_feed_counts(Walker *w, void *Py_UNUSED(c)) {
    if (!(w->unknown_events | w->unknown_fields | w->event_schema | w->too_large)) Py_RETURN_NONE;
    return Py_BuildValue("(nnnn)", w->unknown_events, w->unknown_fields, w->event_schema,
                         w->too_large);
}

static int Walker_init(Walker *w, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"max_events", "max_hashes", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nn", kw, &w->max_events, &w->max_hashes))
        return -1;
    walker_reset(w);
    return 0;
}

static PyObject *Walker_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Walker *w = (Walker *)type->tp_alloc(type, 0);
    if (!w) return NULL;
    w->events.size = sizeof(Event);
    w->rows.size = 8;
    w->copies.size = 4;
    w->specs.size = sizeof(Spec);
    return (PyObject *)w;
}

static void Walker_dealloc(Walker *w) {
    PyMem_RawFree(w->events.p); PyMem_RawFree(w->rows.p);
    PyMem_RawFree(w->copies.p); PyMem_RawFree(w->specs.p);
    for (int i = 0; i < N_SETS; i++) lset_free(&w->sets[i]);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef Walker_methods[] = {
    {"feed", (PyCFunction)Walker_feed, METH_O,
     "Walk one payload: events it holds (as the reference counts them), or -1 if unsure."},
    {"labels", (PyCFunction)Walker_labels, METH_NOARGS,
     "Distinct label values and group specs of the pending events."},
    {"flush", (PyCFunction)Walker_flush, METH_VARARGS, "The pending rows as columns."},
    {"reset", (PyCFunction)Walker_reset, METH_NOARGS, "Forget everything pending."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Walker_getset[] = {
    {"pending", (getter)Walker_get_pending, NULL, "Events pending, as the reference counts.", NULL},
    {"events", (getter)Walker_get_events, NULL, "Events pending that will give rows.", NULL},
    {"rows", (getter)Walker_get_rows, NULL, "Rows pending (one per hash, one per clear).", NULL},
    {"last_ts", (getter)Walker_get_last_ts, NULL, "The last payload's timestamp.", NULL},
    {"dp_rank", (getter)Walker_get_dp_rank, NULL, "The last payload's int dp_rank.", NULL},
    {"feed_counts", (getter)Walker_get_feed_counts, NULL,
     "(unknown events, unknown fields, event_schema, too_large) of the last feed, or None.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvcache_exporter.protocol._wire.Walker",
    .tp_basicsize = sizeof(Walker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "msgpack KV-event payloads to columns (see compiled.py).",
    .tp_new = Walker_new,
    .tp_init = (initproc)Walker_init,
    .tp_dealloc = (destructor)Walker_dealloc,
    .tp_methods = Walker_methods,
    .tp_getset = Walker_getset,
};

static struct PyModuleDef wire_module = {
    PyModuleDef_HEAD_INIT, "_wire", "Compiled decode stage (see compiled.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__wire(void) {
    init_scalar_sizes();
    init_names();
    if (PyType_Ready(&WalkerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&wire_module);
    if (!m) return NULL;
    Py_INCREF(&WalkerType);
    if (PyModule_AddObject(m, "Walker", (PyObject *)&WalkerType) < 0) {
        Py_DECREF(&WalkerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
