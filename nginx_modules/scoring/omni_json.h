/*
 * Omni Proxy scoring library: JSON scanner and splicer.
 *
 * The proxy must read and rewrite request bodies of up to many megabytes at
 * line rate, while never touching anything but the top-level keys it owns
 * (a message that contains the word "stream" must never be rewritten).  So:
 *
 *   omni_json_scan()   validates the whole document (RFC 8259, UTF-8) in one
 *                      pass and records only the members of the top-level
 *                      object: spans of each key and value.  No tree.
 *   omni_json_*_get()  read nested values on demand from an already
 *                      validated span (used for small upstream responses).
 *   omni_json_plan()   turns a list of top-level edits into a list of
 *                      segments (spans of the input and short new texts) whose
 *                      concatenation is the edited document: nginx sends them
 *                      as a buffer chain without copying the prompt.
 *   omni_json_apply()  the same, written into one caller-sized buffer.
 *
 * Offsets are byte offsets into the caller's buffer.  Nothing here allocates;
 * every output goes to caller-supplied arrays/buffers.  Documents are limited
 * to 4 GiB - 1 (offsets are 32-bit).
 */

#ifndef OMNI_JSON_H
#define OMNI_JSON_H

#include "omni_common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    OMNI_JSON_NULL   = 0,
    OMNI_JSON_FALSE  = 1,
    OMNI_JSON_TRUE   = 2,
    OMNI_JSON_NUMBER = 3,
    OMNI_JSON_STRING = 4,
    OMNI_JSON_ARRAY  = 5,
    OMNI_JSON_OBJECT = 6,
} omni_json_type_t;

/* Nesting depth counts open arrays/objects: "1" is 0 deep, "[[1]]" 2. */
#define OMNI_JSON_DEFAULT_MAX_DEPTH  512
#define OMNI_JSON_MAX_DEPTH_LIMIT    16384   /* largest max_depth accepted */
#define OMNI_JSON_MAX_EDITS          64      /* most edits per plan/apply */

/* One member of the top-level object. */
typedef struct {
    uint32_t  key_off;      /* offset of the key's opening quote */
    uint32_t  key_len;      /* raw length including both quotes */
    uint32_t  val_off;      /* offset of the value's first byte */
    uint32_t  val_len;      /* raw length of the value text */
    uint8_t   type;         /* omni_json_type_t of the value */
    uint8_t   key_escaped;  /* the raw key contains a backslash escape */
} omni_json_member_t;

/* What omni_json_scan() found. */
typedef struct {
    uint32_t     root_off;   /* span of the top-level value, */
    uint32_t     root_len;   /*   surrounding whitespace excluded */
    uint8_t      type;       /* omni_json_type_t of the top-level value */
    uint32_t     n_members;  /* top-level object members seen (may be > cap) */
    uint32_t     err_off;    /* on OMNI_EJSON/OMNI_EDEPTH: offset of the fault */
    const char  *err_msg;    /* on error: static text, e.g. "unexpected byte" */
} omni_json_doc_t;

/*
 * Validate buf[0, len) as one JSON text (RFC 8259; strings and the whole
 * text must be valid UTF-8; leading/trailing whitespace allowed; nothing
 * else after the value).  When the top-level value is an object, its members
 * are stored in members[0, min(cap, n_members)) in document order (duplicate
 * keys included).  members may be NULL when cap is 0 (validation only).
 *
 * Returns OMNI_OK, OMNI_EJSON (invalid; doc->err_off/err_msg say where and
 * why), OMNI_EDEPTH (nesting deeper than max_depth; 0 means the default),
 * OMNI_ERANGE (valid, but more than cap members: doc->n_members tells how many
 * to allow), OMNI_EINVAL (NULL arguments, len >= 4 GiB, max_depth above
 * OMNI_JSON_MAX_DEPTH_LIMIT).
 */
int omni_json_scan(const uint8_t *buf, size_t len, uint32_t max_depth,
    omni_json_member_t *members, size_t cap, omni_json_doc_t *doc);

/*
 * Index of the LAST member whose decoded key equals key[0, key_len) (JSON
 * semantics: the last duplicate wins), or -1.  Escaped keys ("\u0073tream")
 * are compared after decoding.
 */
long omni_json_find(const uint8_t *buf, const omni_json_member_t *members,
    size_t n, const char *key, size_t key_len);

/*
 * Nested reads on a span that omni_json_scan() already validated (behaviour
 * on unvalidated input is safe but the result is unspecified).
 * object_get: the last member named key of the object at buf[off, off+len).
 * array_get:  element `index` of the array at buf[off, off+len).
 * Both return OMNI_OK with *vo, *vl, *type set, OMNI_ENOTFOUND, or OMNI_ETYPE
 * when the span is not an object/array.
 */
int omni_json_object_get(const uint8_t *buf, size_t off, size_t len,
    const char *key, size_t key_len, size_t *vo, size_t *vl, int *type);
int omni_json_array_get(const uint8_t *buf, size_t off, size_t len,
    size_t index, size_t *vo, size_t *vl, int *type);

/* Number of elements of the (validated) array at buf[off, off+len). */
int omni_json_array_count(const uint8_t *buf, size_t off, size_t len,
    size_t *n);

/*
 * The (validated) array at buf[off, off+len) as unsigned 32-bit integers:
 * every element must be an integer literal in [0, 2^32) without fraction or
 * exponent, else OMNI_ETYPE.  *n is the element count; when it exceeds cap
 * the first cap are stored and OMNI_ERANGE is returned.
 */
int omni_json_u32_array(const uint8_t *buf, size_t off, size_t len,
    uint32_t *out, size_t cap, size_t *n);

/*
 * The (validated) number at buf[off, off+len) as an int64: OMNI_ETYPE when it
 * is not a number, has a fraction/exponent that makes it non-integral, or
 * does not fit.  ("2.0" and "2e3" are integral and accepted.)
 */
int omni_json_int64(const uint8_t *buf, size_t off, size_t len, int64_t *v);

/*
 * Decode the (validated) string at buf[off, off+len) (quotes included) into
 * out as UTF-8 without quotes.  *n is the decoded length; OMNI_ERANGE when
 * it exceeds cap (out then holds the first cap bytes).  A lone surrogate
 * escape ("\ud800" without its pair) becomes its 3-byte generalized UTF-8
 * form (WTF-8, ED A0 80), so nothing is lost; a pair is one code point.
 * omni_json_find() compares keys in the same decoded form.
 */
int omni_json_string_decode(const uint8_t *buf, size_t off, size_t len,
    uint8_t *out, size_t cap, size_t *n);

/*
 * Write in[0, len) as a JSON string literal (with quotes) into out.
 * Escapes '"', '\\' and control characters; invalid UTF-8 bytes become
 * U+FFFD.  *n is the needed length; OMNI_ERANGE when it exceeds cap.
 */
int omni_json_string_encode(const uint8_t *in, size_t len, uint8_t *out,
    size_t cap, size_t *n);

/* Top-level edits. */
typedef enum {
    OMNI_JSON_SET    = 1,   /* set key to value (raw JSON text) */
    OMNI_JSON_DELETE = 2,   /* remove every member named key */
} omni_json_op_t;

typedef struct {
    int             op;         /* omni_json_op_t */
    const char     *key;        /* decoded key text, no quotes */
    size_t          key_len;
    const uint8_t  *value;      /* SET: raw JSON text, the caller's promise */
    size_t          value_len;  /*      that it is one valid JSON value */
} omni_json_edit_t;

/* One output piece: `len` bytes at `ptr` (into the input, an edit's value
 * or key, or the library's constant punctuation). */
typedef struct {
    const uint8_t  *ptr;
    size_t          len;
} omni_json_seg_t;

/*
 * Plan the edits on a document scanned by omni_json_scan() whose top-level
 * value is an object (else OMNI_ETYPE).  members/n_members must be the
 * complete list (after OMNI_ERANGE, scan again with a larger array): a
 * member left out is copied as unknown text and never edited.  Semantics,
 * per edit key:
 *   SET:    the last member with that key keeps its position and gets the new
 *           value; earlier duplicates are removed; absent -> appended last.
 *   DELETE: every member with that key is removed.
 * Members not named by an edit, and all whitespace and nested content, are
 * copied unchanged.  The result is always valid JSON (commas fixed up).
 * Several edits may name the same key: they apply in order.
 * Keys of SET edits are written with JSON escaping.
 *
 * Segments go to segs[0, cap); *nseg is the count needed (OMNI_ERANGE when it
 * exceeds cap; 2 * n_members + 6 * n_edits + 4 is always enough), *out_len
 * the total output length.  Segments point into buf, the edits' own memory,
 * or static storage, so they stay valid as long as those do; a SET key that
 * needs escaping is written from `scratch` (cap scratch_cap bytes, may be
 * NULL when no key needs escaping, else OMNI_ERANGE; the sum over SET keys of
 * 6 * key_len + 2 is always enough).  At most OMNI_JSON_MAX_EDITS edits
 * (else OMNI_EINVAL, also for a SET without value or an unknown op).
 */
int omni_json_plan(const uint8_t *buf, size_t len,
    const omni_json_member_t *members, size_t n_members,
    const omni_json_edit_t *edits, size_t n_edits,
    omni_json_seg_t *segs, size_t cap, size_t *nseg, size_t *out_len,
    uint8_t *scratch, size_t scratch_cap);

/*
 * omni_json_plan() + concatenation into out[0, cap).  *out_len is the needed
 * size; OMNI_ERANGE (nothing useful written) when it exceeds cap.  out must
 * not overlap buf.
 */
int omni_json_apply(const uint8_t *buf, size_t len,
    const omni_json_member_t *members, size_t n_members,
    const omni_json_edit_t *edits, size_t n_edits,
    uint8_t *out, size_t cap, size_t *out_len);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_JSON_H */
