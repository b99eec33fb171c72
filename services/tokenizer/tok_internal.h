/* tok_internal.h - the inside of cpm_tokenizer, shared by the files of the
 * tokenizer library only (loaders tok_hf.c / tok_spm.c fill it; tok_bpe.c,
 * tokenizer.c, detok.c and chat.c read it). Not installed, not for callers.
 */
#ifndef CPM_TOK_INTERNAL_H
#define CPM_TOK_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "services/tokenizer/tokenizer.h"
#include "services/tokenizer/strbuf.h"
#include "services/tokenizer/tok_vocab.h"

enum cpm_tok_kind {
    CPM_TOK_HF = 1,  /* tokenizer.json: merges ranked by the merges list */
    CPM_TOK_SPM = 2, /* tokenizer.model: merges ranked by piece score */
};

/* One normalizer step of a tokenizer.json (only the literal ones MiniCPM uses). */
enum cpm_tok_norm_op { CPM_NORM_PREPEND = 1, CPM_NORM_REPLACE = 2 };

typedef struct cpm_tok_norm {
    int op;
    char *a, *b; /* PREPEND: a = text; REPLACE: a -> b */
    size_t a_len, b_len;
} cpm_tok_norm;

#define CPM_TOK_MAX_NORM 8
#define CPM_TOK_MAX_POST 4
#define CPM_TOK_MAX_STOP 16

/* An added token matched whole in raw text (before normalization and BPE). */
typedef struct cpm_tok_added {
    uint32_t off, len; /* its text, in the vocab blob */
    int32_t id;
} cpm_tok_added;

/* Hash map (left id, right id) -> (rank, merged id) for tokenizer.json merges. */
typedef struct cpm_tok_merge_slot {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty slot */
    uint32_t rank;
    int32_t merged;
} cpm_tok_merge_slot;

typedef struct cpm_tok_merges {
    cpm_tok_merge_slot *slots; /* one cache line holds 4 probes */
    size_t mask;
    size_t count;
} cpm_tok_merges;

struct cpm_tokenizer {
    int kind;
    cpm_vocab vocab;   /* every id: model pieces, then added tokens */
    int32_t n_model;   /* ids below this are model pieces (BPE may produce them) */
    int32_t unk_id;    /* -1 when none */
    bool byte_fallback;
    bool fuse_unk;     /* HF: consecutive unknown chars become one <unk> */
    bool ignore_merges;
    int32_t byte_id[256];   /* id of <0xNN>, -1 when missing */
    int32_t ascii_id[128];  /* id of the one-byte piece, -1 when none (fast path) */

    /* No piece has "▁" right after another character, so no merge can join across
     * a word start: BPE may run word by word (shorter heaps, same result). */
    bool word_split;

    /* HF merges; SPM uses vocab ranks (tok_vocab.h) instead. */
    cpm_tok_merges merges;

    /* SPM user-defined pieces: kept whole, found by longest prefix. */
    uint32_t ud_lengths[256]; /* per first byte: bit L-1 set = a piece of L bytes (L <= 32) */
    bool ud_long[256];        /* per first byte: some piece is longer than 32 bytes */
    uint32_t ud_max_len;

    /* Added tokens, sorted longest first; first-byte filter for the scan. */
    cpm_tok_added *added;
    size_t n_added;
    bool added_first[256];

    /* Normalizer applied to each text segment between added tokens. */
    cpm_tok_norm norm[CPM_TOK_MAX_NORM];
    int n_norm;

    /* Post-processor: ids around the sequence when add_special. */
    int32_t post_prefix[CPM_TOK_MAX_POST], post_suffix[CPM_TOK_MAX_POST];
    int n_post_prefix, n_post_suffix;

    /* Decoder: replace dec_from -> dec_to in every piece, then join byte runs,
     * then strip dec_strip_start leading dec_strip_char from the whole text. */
    char dec_from[8], dec_to[8];
    size_t dec_from_len, dec_to_len;
    bool dec_byte_fallback;
    int dec_strip_start;
    char dec_strip_char;

    int32_t bos_id, eos_id;
    bool add_bos, add_eos;
    int32_t stop_ids[CPM_TOK_MAX_STOP];
    size_t n_stop;
    cpm_chat_family chat_family;
};

/* tok_hf.c: fills tok from a tokenizer.json image. */
int cpm_tokhf_load(cpm_tokenizer *tok, const char *data, size_t len, const char *name,
                   cpm_error *err);

/* tok_spm.c: fills tok from a tokenizer.model image. */
int cpm_tokspm_load(cpm_tokenizer *tok, const uint8_t *data, size_t len, const char *name,
                    cpm_error *err);

/* tok_bpe.c: the merges table. init sizes it for n pairs; add keeps the last
 * rank of a pair listed twice (as the HF loader does); CPM_ELIMIT when full. */
int cpm_tok_merges_init(cpm_tok_merges *m, size_t n);
int cpm_tok_merges_add(cpm_tok_merges *m, int32_t a, int32_t b, uint32_t rank, int32_t merged);
void cpm_tok_merges_release(cpm_tok_merges *m);

/* tokenizer.c: common set-up once the pieces are in (byte ids, ascii fast path,
 * added token order). Called by both loaders at their end. */
int cpm_tok_finish(cpm_tokenizer *tok, const char *name, cpm_error *err);

/* tokenizer.c: registers an added token (id may be new, past the model pieces,
 * or an existing piece); special marks it for skip_special. */
int cpm_tok_add_token(cpm_tokenizer *tok, int32_t id, const char *s, size_t len, bool special,
                      const char *name, cpm_error *err);

/* tok_bpe.c: BPE over one normalized segment; appends ids to *ids. */
typedef struct cpm_tok_ids {
    int32_t *v;
    size_t n, cap;
} cpm_tok_ids;

typedef struct cpm_bpe_scratch cpm_bpe_scratch;
cpm_bpe_scratch *cpm_bpe_scratch_new(void);
void cpm_bpe_scratch_free(cpm_bpe_scratch *s);
int cpm_bpe_encode(const cpm_tokenizer *tok, cpm_bpe_scratch *s, const char *text, size_t len,
                   cpm_tok_ids *ids, cpm_error *err);
int cpm_tok_ids_push(cpm_tok_ids *ids, int32_t id);

/* tokenizer.c, for decode and detok.c: appends a held byte run - its UTF-8 text
 * if the whole run is valid, else one U+FFFD per byte (the HF ByteFallback
 * decoder) - and empties the run. */
int cpm_tok_flush_bytes(cpm_strbuf *out, cpm_strbuf *run);
/* Appends the text of one non-byte piece with the decoder's Replace applied. */
int cpm_tok_piece_text(const cpm_tokenizer *tok, int32_t id, cpm_strbuf *out);

/* Parses "<0xNN>" (the HF ByteFallback rule: 6 bytes, hex digits); -1 if not one. */
int cpm_tok_byte_piece(const char *s, size_t len);

#endif
