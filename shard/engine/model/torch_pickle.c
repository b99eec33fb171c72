/* torch_pickle.c - a pickle virtual machine that only knows state dicts.
 *
 * Runs the opcodes of protocols 2-4 that torch.save emits, over a value model of
 * ints, strings, tuples, lists, dicts, allow-listed globals, storages and tensors.
 * REDUCE is interpreted for the allowed callables only; nothing is imported or run.
 */
#include "torch_pickle.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* Bounds on what a pickle can make us allocate beyond its own size. */
#define TP_MAX_STACK (1u << 16)
#define TP_MAX_MARKS (1u << 12)
#define TP_MAX_MEMO (1u << 22)
#define TP_MAX_STRING (1u << 20)
#define TP_MAX_GLOBAL_NAME 256

typedef enum pv_kind {
    PV_NONE,
    PV_BOOL,
    PV_INT,
    PV_FLOAT,
    PV_STR,
    PV_TUPLE,
    PV_LIST,
    PV_DICT, /* items holds key, value, key, value... */
    PV_GLOBAL,
    PV_STORAGE,
    PV_TENSOR,
} pv_kind;

typedef enum tp_global {
    G_ORDERED_DICT,
    G_REBUILD_TENSOR_V2,
    G_REBUILD_PARAMETER,
    G_STORAGE, /* + storage type index */
} tp_global;

typedef struct pv pv;
struct pv {
    pv_kind kind;
    pv *next; /* every value ever made, for freeing */
    int64_t i; /* INT, BOOL; GLOBAL: tp_global; STORAGE: type index */
    char *s;   /* STR (NUL-terminated copy); STORAGE: key */
    size_t len;
    pv **items; /* TUPLE, LIST, DICT */
    size_t n, cap;
    cpm_torch_tensor t; /* TENSOR (name unset); STORAGE: dtype, elsize, numel */
    const pv *storage;  /* TENSOR */
};

/* The storage classes torch.save names, with the safetensors spelling of each. */
static const struct {
    const char *cls, *dtype;
    size_t elsize;
} storage_types[] = {
    {"FloatStorage", "F32", 4},  {"HalfStorage", "F16", 2},   {"BFloat16Storage", "BF16", 2},
    {"DoubleStorage", "F64", 8}, {"LongStorage", "I64", 8},   {"IntStorage", "I32", 4},
    {"ShortStorage", "I16", 2},  {"CharStorage", "I8", 1},    {"ByteStorage", "U8", 1},
    {"BoolStorage", "BOOL", 1},
};
#define N_STORAGE_TYPES (sizeof storage_types / sizeof storage_types[0])

typedef struct tp_vm {
    const uint8_t *buf;
    size_t len, pos, op_pos;
    const char *where;
    cpm_error *err;
    pv *all;
    pv **stack;
    size_t sp;
    size_t marks[TP_MAX_MARKS];
    size_t nmarks;
    pv **memo;
    size_t memo_cap;
    size_t memo_len; /* entries set: MEMOIZE's next index */
    pv *result;
} tp_vm;

struct cpm_torch_pickle {
    size_t count;
    cpm_torch_tensor *tensors;
    char **strings; /* owned copies behind the tensors' const char * */
    size_t nstrings;
};

/* Returns code itself (not cpm_error_set's result) so the compiler sees that
 * every failure path is negative. */
static int fail(tp_vm *vm, int code, const char *what) {
    cpm_error_set(vm->err, code, "%s: %s (opcode 0x%02x at offset %zu)", vm->where, what,
                  vm->op_pos < vm->len ? vm->buf[vm->op_pos] : 0, vm->op_pos);
    return code;
}

static pv *pv_new(tp_vm *vm, pv_kind kind) {
    pv *v = calloc(1, sizeof *v);
    if (!v)
        return NULL;
    v->kind = kind;
    v->next = vm->all;
    vm->all = v;
    return v;
}

static void pv_free_all(pv *v) {
    while (v) {
        pv *next = v->next;
        free(v->s);
        free(v->items);
        free(v);
        v = next;
    }
}

static int pv_append(tp_vm *vm, pv *seq, pv *item) {
    if (seq->n == seq->cap) {
        size_t cap = seq->cap ? seq->cap * 2 : 8;
        pv **items = realloc(seq->items, cap * sizeof *items);
        if (!items)
            return fail(vm, CPM_ENOMEM, "out of memory");
        seq->items = items;
        seq->cap = cap;
    }
    seq->items[seq->n++] = item;
    return 0;
}

/* ---- input ---- */

static int take(tp_vm *vm, size_t n, const uint8_t **ret) {
    if (n > vm->len - vm->pos)
        return fail(vm, CPM_EFORMAT, "truncated");
    *ret = vm->buf + vm->pos;
    vm->pos += n;
    return 0;
}

static int take_uint(tp_vm *vm, size_t n, uint64_t *ret) {
    const uint8_t *p;
    int rc = take(vm, n, &p);
    if (rc < 0)
        return rc;
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;)
        v = (v << 8) | p[i];
    *ret = v;
    return 0;
}

/* ---- stack and memo ---- */

static int push(tp_vm *vm, pv *v) {
    if (!v)
        return fail(vm, CPM_ENOMEM, "out of memory");
    if (vm->sp == TP_MAX_STACK)
        return fail(vm, CPM_ELIMIT, "stack deeper than the limit");
    vm->stack[vm->sp++] = v;
    return 0;
}

static size_t mark_base(const tp_vm *vm) {
    return vm->nmarks ? vm->marks[vm->nmarks - 1] : 0;
}

static int pop(tp_vm *vm, pv **ret) {
    if (vm->sp == mark_base(vm))
        return fail(vm, CPM_EFORMAT, "stack underflow");
    *ret = vm->stack[--vm->sp];
    return 0;
}

static int top(tp_vm *vm, pv **ret) {
    if (vm->sp == mark_base(vm))
        return fail(vm, CPM_EFORMAT, "stack underflow");
    *ret = vm->stack[vm->sp - 1];
    return 0;
}

/* Removes the topmost mark; the values above it stay at stack[*ret_base..sp). */
static int pop_mark(tp_vm *vm, size_t *ret_base) {
    if (vm->nmarks == 0)
        return fail(vm, CPM_EFORMAT, "no MARK on the stack");
    *ret_base = vm->marks[--vm->nmarks];
    return 0;
}

static int memo_put(tp_vm *vm, uint64_t idx) {
    pv *v;
    int rc = top(vm, &v);
    if (rc < 0)
        return rc;
    if (idx >= TP_MAX_MEMO)
        return fail(vm, CPM_ELIMIT, "memo index past the limit");
    if (idx >= vm->memo_cap) {
        size_t cap = vm->memo_cap ? vm->memo_cap : 64;
        while (cap <= idx)
            cap *= 2;
        pv **memo = realloc(vm->memo, cap * sizeof *memo);
        if (!memo)
            return fail(vm, CPM_ENOMEM, "out of memory");
        memset(memo + vm->memo_cap, 0, (cap - vm->memo_cap) * sizeof *memo);
        vm->memo = memo;
        vm->memo_cap = cap;
    }
    if (!vm->memo[idx])
        vm->memo_len++;
    vm->memo[idx] = v;
    return 0;
}

static int memo_get(tp_vm *vm, uint64_t idx) {
    if (idx >= vm->memo_cap || !vm->memo[idx])
        return fail(vm, CPM_EFORMAT, "memo entry read before it was written");
    return push(vm, vm->memo[idx]);
}

/* ---- scalars and strings ---- */

static int op_int(tp_vm *vm, size_t n, bool is_signed) {
    uint64_t u;
    int rc = take_uint(vm, n, &u);
    if (rc < 0)
        return rc;
    pv *v = pv_new(vm, PV_INT);
    if (v)
        v->i = is_signed ? (int64_t)(int32_t)(uint32_t)u : (int64_t)u;
    return push(vm, v);
}

/* LONG1/LONG4: little-endian two's complement of n bytes; we keep what fits 64 bits. */
static int op_long(tp_vm *vm, size_t len_bytes) {
    uint64_t n;
    const uint8_t *p;
    int rc = take_uint(vm, len_bytes, &n);
    if (rc < 0)
        return rc;
    if (n > 8)
        return fail(vm, CPM_ELIMIT, "integer wider than 64 bits");
    if ((rc = take(vm, (size_t)n, &p)) < 0)
        return rc;
    uint64_t u = 0;
    for (size_t i = (size_t)n; i-- > 0;)
        u = (u << 8) | p[i];
    if (n > 0 && n < 8 && (p[n - 1] & 0x80))
        u |= ~0ull << (8 * n); /* sign-extend */
    pv *v = pv_new(vm, PV_INT);
    if (v)
        v->i = (int64_t)u;
    return push(vm, v);
}

static int op_string(tp_vm *vm, size_t len_bytes) {
    uint64_t n;
    const uint8_t *p;
    int rc = take_uint(vm, len_bytes, &n);
    if (rc < 0)
        return rc;
    if (n > TP_MAX_STRING)
        return fail(vm, CPM_ELIMIT, "string longer than the limit");
    if ((rc = take(vm, (size_t)n, &p)) < 0)
        return rc;
    pv *v = pv_new(vm, PV_STR);
    if (!v || !(v->s = malloc((size_t)n + 1)))
        return fail(vm, CPM_ENOMEM, "out of memory");
    memcpy(v->s, p, (size_t)n);
    v->s[n] = '\0';
    v->len = (size_t)n;
    return push(vm, v);
}

static int op_float(tp_vm *vm) {
    const uint8_t *p;
    int rc = take(vm, 8, &p);
    if (rc < 0)
        return rc;
    return push(vm, pv_new(vm, PV_FLOAT)); /* metadata only; the value is never used */
}

static int op_const(tp_vm *vm, pv_kind kind, int64_t i) {
    pv *v = pv_new(vm, kind);
    if (v)
        v->i = i;
    return push(vm, v);
}

/* ---- containers ---- */

static int op_tuple_n(tp_vm *vm, size_t n) {
    if (vm->sp - mark_base(vm) < n)
        return fail(vm, CPM_EFORMAT, "stack underflow");
    pv *t = pv_new(vm, PV_TUPLE);
    if (!t)
        return fail(vm, CPM_ENOMEM, "out of memory");
    for (size_t i = vm->sp - n; i < vm->sp; i++) {
        int rc = pv_append(vm, t, vm->stack[i]);
        if (rc < 0)
            return rc;
    }
    vm->sp -= n;
    return push(vm, t);
}

/* TUPLE, LIST, DICT: build kind from the values above the topmost mark. */
static int op_from_mark(tp_vm *vm, pv_kind kind) {
    size_t base;
    int rc = pop_mark(vm, &base);
    if (rc < 0)
        return rc;
    if (kind == PV_DICT && (vm->sp - base) % 2)
        return fail(vm, CPM_EFORMAT, "odd number of dict items");
    pv *v = pv_new(vm, kind);
    if (!v)
        return fail(vm, CPM_ENOMEM, "out of memory");
    for (size_t i = base; i < vm->sp; i++)
        if ((rc = pv_append(vm, v, vm->stack[i])) < 0)
            return rc;
    vm->sp = base;
    return push(vm, v);
}

/* SETITEM(S), APPEND(S): add the values above base to the container below them. */
static int add_items(tp_vm *vm, size_t base, pv_kind want) {
    if (base == 0 || base <= mark_base(vm))
        return fail(vm, CPM_EFORMAT, "stack underflow");
    pv *c = vm->stack[base - 1];
    if (c->kind != want)
        return fail(vm, CPM_EFORMAT,
                    want == PV_DICT ? "SETITEM on something that is not a dict"
                                    : "APPEND on something that is not a list");
    if (want == PV_DICT && (vm->sp - base) % 2)
        return fail(vm, CPM_EFORMAT, "odd number of dict items");
    for (size_t i = base; i < vm->sp; i++) {
        int rc = pv_append(vm, c, vm->stack[i]);
        if (rc < 0)
            return rc;
    }
    vm->sp = base;
    return 0;
}

static int op_add_marked(tp_vm *vm, pv_kind want) {
    size_t base;
    int rc = pop_mark(vm, &base);
    return rc < 0 ? rc : add_items(vm, base, want);
}

static int op_add_one(tp_vm *vm, pv_kind want) {
    size_t n = want == PV_DICT ? 2 : 1;
    if (vm->sp - mark_base(vm) < n)
        return fail(vm, CPM_EFORMAT, "stack underflow");
    return add_items(vm, vm->sp - n, want);
}

/* ---- globals and the calls we allow ---- */

static int resolve_global(tp_vm *vm, const char *mod, const char *name) {
    int64_t g = -1;
    if (!strcmp(mod, "collections") && !strcmp(name, "OrderedDict"))
        g = G_ORDERED_DICT;
    else if (!strcmp(mod, "torch._utils") && !strcmp(name, "_rebuild_tensor_v2"))
        g = G_REBUILD_TENSOR_V2;
    else if (!strcmp(mod, "torch._utils") && !strcmp(name, "_rebuild_parameter"))
        g = G_REBUILD_PARAMETER;
    else if (!strcmp(mod, "torch"))
        for (size_t i = 0; i < N_STORAGE_TYPES; i++)
            if (!strcmp(name, storage_types[i].cls))
                g = G_STORAGE + (int64_t)i;
    if (g < 0)
        return cpm_error_set(vm->err, CPM_EUNSUPPORTED,
                             "%s: global '%.100s.%.100s' is not allowed (offset %zu)",
                             vm->where, mod, name, vm->op_pos);
    return op_const(vm, PV_GLOBAL, g);
}

static int read_line(tp_vm *vm, char *out) {
    size_t n = 0;
    for (;;) {
        const uint8_t *c;
        int rc = take(vm, 1, &c);
        if (rc < 0)
            return rc;
        if (*c == '\n')
            break;
        if (n + 1 >= TP_MAX_GLOBAL_NAME || *c == 0)
            return fail(vm, CPM_EFORMAT, "bad GLOBAL name");
        out[n++] = (char)*c;
    }
    out[n] = '\0';
    return 0;
}

static int op_global(tp_vm *vm) {
    char mod[TP_MAX_GLOBAL_NAME], name[TP_MAX_GLOBAL_NAME];
    int rc = read_line(vm, mod);
    if (rc == 0)
        rc = read_line(vm, name);
    return rc < 0 ? rc : resolve_global(vm, mod, name);
}

static int op_stack_global(tp_vm *vm) {
    pv *name = NULL, *mod = NULL;
    int rc = pop(vm, &name);
    if (rc == 0)
        rc = pop(vm, &mod);
    if (rc < 0)
        return rc;
    if (name->kind != PV_STR || mod->kind != PV_STR || strlen(name->s) != name->len ||
        strlen(mod->s) != mod->len)
        return fail(vm, CPM_EFORMAT, "STACK_GLOBAL needs two strings");
    return resolve_global(vm, mod->s, name->s);
}

static bool is_int_tuple(const pv *t, size_t max_n) {
    if (t->kind != PV_TUPLE || t->n > max_n)
        return false;
    for (size_t i = 0; i < t->n; i++)
        if (t->items[i]->kind != PV_INT || t->items[i]->i < 0)
            return false;
    return true;
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
 *                    backward_hooks[, metadata]) */
static int rebuild_tensor(tp_vm *vm, const pv *args) {
    pv *const *a = args->items;
    if (args->n < 6 || args->n > 7)
        return fail(vm, CPM_EFORMAT, "_rebuild_tensor_v2 takes 6 or 7 arguments");
    if (a[0]->kind != PV_STORAGE || a[1]->kind != PV_INT || a[1]->i < 0)
        return fail(vm, CPM_EFORMAT, "_rebuild_tensor_v2: bad storage or offset");
    if (!is_int_tuple(a[2], CPM_TORCH_MAX_DIMS) || !is_int_tuple(a[3], CPM_TORCH_MAX_DIMS) ||
        a[2]->n != a[3]->n)
        return fail(vm, CPM_EFORMAT, "_rebuild_tensor_v2: bad size or stride");
    pv *t = pv_new(vm, PV_TENSOR);
    if (!t)
        return fail(vm, CPM_ENOMEM, "out of memory");
    t->storage = a[0];
    t->t = a[0]->t;
    t->t.storage_key = a[0]->s;
    t->t.offset = (uint64_t)a[1]->i;
    t->t.ndim = (int)a[2]->n;
    for (size_t d = 0; d < a[2]->n; d++) {
        t->t.size[d] = a[2]->items[d]->i;
        t->t.stride[d] = a[3]->items[d]->i;
    }
    return push(vm, t);
}

static int op_reduce(tp_vm *vm) {
    pv *args = NULL, *fn = NULL;
    int rc = pop(vm, &args);
    if (rc == 0)
        rc = pop(vm, &fn);
    if (rc < 0)
        return rc;
    if (fn->kind != PV_GLOBAL || args->kind != PV_TUPLE)
        return fail(vm, CPM_EFORMAT, "REDUCE needs an allowed global and a tuple");
    switch (fn->i) {
    case G_ORDERED_DICT:
        if (args->n != 0)
            return fail(vm, CPM_EFORMAT, "OrderedDict called with arguments");
        return push(vm, pv_new(vm, PV_DICT));
    case G_REBUILD_TENSOR_V2:
        return rebuild_tensor(vm, args);
    case G_REBUILD_PARAMETER: /* (tensor, requires_grad, hooks): the tensor itself */
        if (args->n != 3 || args->items[0]->kind != PV_TENSOR)
            return fail(vm, CPM_EFORMAT, "_rebuild_parameter needs a tensor");
        return push(vm, args->items[0]);
    default:
        return fail(vm, CPM_EFORMAT, "a storage class cannot be called");
    }
}

/* BUILD on an OrderedDict sets its __dict__ (state_dict's _metadata): ignored. */
static int op_build(tp_vm *vm) {
    pv *state = NULL, *obj = NULL;
    int rc = pop(vm, &state);
    if (rc == 0)
        rc = top(vm, &obj);
    if (rc < 0)
        return rc;
    if (obj->kind != PV_DICT)
        return fail(vm, CPM_EFORMAT, "BUILD on something that is not a dict");
    return 0;
}

/* BINPERSID ('storage', <storage class>, key, location, numel) */
static int op_persid(tp_vm *vm) {
    pv *pid;
    int rc = pop(vm, &pid);
    if (rc < 0)
        return rc;
    pv *const *a = pid->items;
    if (pid->kind != PV_TUPLE || pid->n != 5 || a[0]->kind != PV_STR ||
        strcmp(a[0]->s, "storage") != 0 || a[1]->kind != PV_GLOBAL || a[1]->i < G_STORAGE ||
        a[2]->kind != PV_STR || a[3]->kind != PV_STR || a[4]->kind != PV_INT || a[4]->i < 0)
        return fail(vm, CPM_EFORMAT,
                    "persistent id is not ('storage', type, key, location, numel)");
    if (a[2]->len == 0 || strlen(a[2]->s) != a[2]->len || strchr(a[2]->s, '/'))
        return fail(vm, CPM_EFORMAT, "bad storage key");
    pv *s = pv_new(vm, PV_STORAGE);
    if (!s || !(s->s = strdup(a[2]->s)))
        return fail(vm, CPM_ENOMEM, "out of memory");
    size_t type = (size_t)(a[1]->i - G_STORAGE);
    s->t.dtype = storage_types[type].dtype;
    s->t.elsize = storage_types[type].elsize;
    s->t.storage_numel = (uint64_t)a[4]->i;
    return push(vm, s);
}

static int op_stop(tp_vm *vm) {
    pv *v;
    int rc = pop(vm, &v);
    if (rc < 0)
        return rc;
    vm->result = v;
    return 0;
}

static int op_pop(tp_vm *vm) {
    /* As in CPython: POP with only a mark above the values drops the mark. */
    if (vm->nmarks && vm->sp == mark_base(vm)) {
        vm->nmarks--;
        return 0;
    }
    pv *v;
    return pop(vm, &v);
}

static int op_mark(tp_vm *vm) {
    if (vm->nmarks == TP_MAX_MARKS)
        return fail(vm, CPM_ELIMIT, "more MARKs than the limit");
    vm->marks[vm->nmarks++] = vm->sp;
    return 0;
}

static int op_memo_arg(tp_vm *vm, size_t n, bool put) {
    uint64_t idx;
    int rc = take_uint(vm, n, &idx);
    if (rc < 0)
        return rc;
    return put ? memo_put(vm, idx) : memo_get(vm, idx);
}

static int op_proto(tp_vm *vm) {
    uint64_t v;
    int rc = take_uint(vm, 1, &v);
    if (rc < 0)
        return rc;
    if (v < 2 || v > 5)
        return fail(vm, CPM_EUNSUPPORTED, "pickle protocol outside 2..5");
    return 0;
}

static int op_dup(tp_vm *vm) {
    pv *v;
    int rc = top(vm, &v);
    return rc < 0 ? rc : push(vm, v);
}

static int op_pop_mark(tp_vm *vm) {
    size_t base;
    int rc = pop_mark(vm, &base);
    if (rc == 0)
        vm->sp = base;
    return rc;
}

static int step(tp_vm *vm, uint8_t op) {
    uint64_t skip;
    switch (op) {
    case 0x80: return op_proto(vm);
    case 0x95: return take_uint(vm, 8, &skip); /* FRAME: a read-ahead hint */
    case '.': return op_stop(vm);
    case '(': return op_mark(vm);
    case '0': return op_pop(vm);
    case '1': return op_pop_mark(vm);
    case '2': return op_dup(vm);
    case 'N': return op_const(vm, PV_NONE, 0);
    case 0x88: return op_const(vm, PV_BOOL, 1);
    case 0x89: return op_const(vm, PV_BOOL, 0);
    case 'J': return op_int(vm, 4, true);
    case 'K': return op_int(vm, 1, false);
    case 'M': return op_int(vm, 2, false);
    case 0x8a: return op_long(vm, 1);
    case 0x8b: return op_long(vm, 4);
    case 'G': return op_float(vm);
    case 'X': return op_string(vm, 4);
    case 0x8c: return op_string(vm, 1);
    case 0x8d: return op_string(vm, 8);
    case 'T': return op_string(vm, 4); /* BINSTRING: Python 2 str */
    case 'U': return op_string(vm, 1); /* SHORT_BINSTRING */
    case ')': return op_tuple_n(vm, 0);
    case 0x85: return op_tuple_n(vm, 1);
    case 0x86: return op_tuple_n(vm, 2);
    case 0x87: return op_tuple_n(vm, 3);
    case 't': return op_from_mark(vm, PV_TUPLE);
    case 'l': return op_from_mark(vm, PV_LIST);
    case 'd': return op_from_mark(vm, PV_DICT);
    case ']': return push(vm, pv_new(vm, PV_LIST));
    case '}': return push(vm, pv_new(vm, PV_DICT));
    case 'a': return op_add_one(vm, PV_LIST);
    case 'e': return op_add_marked(vm, PV_LIST);
    case 's': return op_add_one(vm, PV_DICT);
    case 'u': return op_add_marked(vm, PV_DICT);
    case 'q': return op_memo_arg(vm, 1, true);
    case 'r': return op_memo_arg(vm, 4, true);
    case 'h': return op_memo_arg(vm, 1, false);
    case 'j': return op_memo_arg(vm, 4, false);
    case 0x94: return memo_put(vm, vm->memo_len);
    case 'c': return op_global(vm);
    case 0x93: return op_stack_global(vm);
    case 'R': return op_reduce(vm);
    case 'b': return op_build(vm);
    case 'Q': return op_persid(vm);
    default: return fail(vm, CPM_EUNSUPPORTED, "opcode not supported");
    }
}

static int run(tp_vm *vm) {
    while (!vm->result) {
        if (vm->pos >= vm->len)
            return cpm_error_set(vm->err, CPM_EFORMAT,
                                 "%s: truncated: no STOP opcode in %zu bytes", vm->where,
                                 vm->len);
        vm->op_pos = vm->pos;
        int rc = step(vm, vm->buf[vm->pos++]);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* ---- result ---- */

static char *keep(cpm_torch_pickle *tp, const char *s) {
    char *c = strdup(s);
    if (c)
        tp->strings[tp->nstrings++] = c;
    return c;
}

static int collect(tp_vm *vm, cpm_torch_pickle *tp) {
    const pv *d = vm->result;
    if (d->kind != PV_DICT)
        return cpm_error_set(vm->err, CPM_EFORMAT,
                             "%s: the pickled object is not a dict of tensors", vm->where);
    size_t n = d->n / 2;
    tp->tensors = calloc(n ? n : 1, sizeof *tp->tensors);
    tp->strings = calloc(2 * n + 1, sizeof *tp->strings);
    if (!tp->tensors || !tp->strings)
        return cpm_error_set(vm->err, CPM_ENOMEM, "%s: out of memory", vm->where);
    for (size_t i = 0; i < n; i++) {
        const pv *k = d->items[2 * i], *v = d->items[2 * i + 1];
        if (k->kind != PV_STR || strlen(k->s) != k->len)
            return cpm_error_set(vm->err, CPM_EFORMAT, "%s: dict key %zu is not a string",
                                 vm->where, i);
        if (v->kind != PV_TENSOR)
            return cpm_error_set(vm->err, CPM_EFORMAT, "%s: entry %s is not a tensor",
                                 vm->where, k->s);
        cpm_torch_tensor *t = &tp->tensors[tp->count++];
        *t = v->t;
        t->name = keep(tp, k->s);
        t->storage_key = keep(tp, v->t.storage_key);
        if (!t->name || !t->storage_key)
            return cpm_error_set(vm->err, CPM_ENOMEM, "%s: out of memory", vm->where);
    }
    return 0;
}

int cpm_torch_pickle_parse(const uint8_t *buf, size_t len, const char *where,
                           cpm_torch_pickle **ret, cpm_error *err) {
    *ret = NULL;
    tp_vm vm = {.buf = buf, .len = len, .where = where, .err = err};
    cpm_torch_pickle *tp = calloc(1, sizeof *tp);
    vm.stack = malloc(TP_MAX_STACK * sizeof *vm.stack);
    int rc = tp && vm.stack ? run(&vm)
                            : cpm_error_set(err, CPM_ENOMEM, "%s: out of memory", where);
    if (rc == 0)
        rc = collect(&vm, tp);
    pv_free_all(vm.all);
    free(vm.stack);
    free(vm.memo);
    if (rc < 0) {
        cpm_torch_pickle_free(tp);
        return rc;
    }
    *ret = tp;
    return 0;
}

void cpm_torch_pickle_free(cpm_torch_pickle *tp) {
    if (!tp)
        return;
    for (size_t i = 0; i < tp->nstrings; i++)
        free(tp->strings[i]);
    free(tp->strings);
    free(tp->tensors);
    free(tp);
}

size_t cpm_torch_pickle_count(const cpm_torch_pickle *tp) {
    return tp->count;
}

const cpm_torch_tensor *cpm_torch_pickle_at(const cpm_torch_pickle *tp, size_t i) {
    return i < tp->count ? &tp->tensors[i] : NULL;
}
