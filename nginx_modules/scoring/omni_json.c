/*
 * Omni Proxy scoring library: JSON scanner and splicer (see omni_json.h).
 *
 * The scanner is one forward pass with no tree and no allocation.  The two
 * shapes of a long request body get their own paths: string contents (a
 * long prompt) are skipped 16..64 bytes at a time with SSE2 (128 with AVX2
 * where the CPU has it), non-ASCII text validated 16 bytes at a time; integer
 * arrays (token-id prompts) are checked 64 bytes at a time from bit masks.
 * Everything else is a small iterative state machine whose nesting stack
 * is a bitmap on the C stack.  Each fast path has a portable fallback (no
 * SSE2, big-endian), and the scalar code reports every error, so offsets
 * do not depend on the path.
 *
 * The nested readers (object_get, array_get, ...) assume a span that the
 * scanner already validated; they still never read outside that span, so a
 * caller's mistake gives a wrong answer or an error, not a crash.
 */

#include <string.h>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

/*
 * The long-string skip also has an AVX2 body, compiled for that target
 * alone and chosen per call by the CPU (the rest of the library stays
 * baseline x86-64): 32 bytes per compare instead of 16, and VEX's
 * three-operand forms need no register copies.
 */
#if defined(__SSE2__) && defined(__x86_64__) && defined(__GNUC__) \
    && !defined(__AVX2__)
#define OMNI_JSON_AVX2  1
#include <immintrin.h>
#endif

#include "omni_json.h"


#define omni_likely(x)    __builtin_expect(!!(x), 1)
#define omni_unlikely(x)  __builtin_expect(!!(x), 0)

/* ' ', '\t', '\n', '\r' as bits of a 64-bit mask */
#define OMNI_WS_MASK  ((1ULL << ' ') | (1ULL << '\t') | (1ULL << '\n') \
                       | (1ULL << '\r'))

#define omni_is_ws(c)     ((c) <= ' ' && ((OMNI_WS_MASK >> (c)) & 1))
#define omni_is_digit(c)  ((uint8_t) ((c) - '0') < 10)


/* Where and why scanning failed. */
typedef struct {
    const uint8_t  *at;
    const char     *msg;
    int             rc;
} omni_json_err_t;


/* Hex digit values; 0xff for anything else.  Read-only. */
static const uint8_t omni_hex[256] = {
    ['0'] = 0x10, ['1'] = 0x11, ['2'] = 0x12, ['3'] = 0x13, ['4'] = 0x14,
    ['5'] = 0x15, ['6'] = 0x16, ['7'] = 0x17, ['8'] = 0x18, ['9'] = 0x19,
    ['a'] = 0x1a, ['b'] = 0x1b, ['c'] = 0x1c, ['d'] = 0x1d, ['e'] = 0x1e,
    ['f'] = 0x1f,
    ['A'] = 0x1a, ['B'] = 0x1b, ['C'] = 0x1c, ['D'] = 0x1d, ['E'] = 0x1e,
    ['F'] = 0x1f,
};
/* (stored +0x10 so that the zero-initialised rest means "not hex") */


static inline const uint8_t *
omni_skip_ws(const uint8_t *p, const uint8_t *end)
{
    while (p < end && omni_is_ws(*p)) {
        p++;
    }

    return p;
}


#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define OMNI_SWAR  1

static inline uint64_t
omni_load64(const uint8_t *p)
{
    uint64_t  v;

    memcpy(&v, p, 8);
    return v;
}


/*
 * Number of leading ASCII digits in the 8 bytes of v (string order), 0..8.
 * A byte is a digit when its high nibble is 3 both before and after adding
 * 6; a carry out of a byte >= 0xfa only disturbs bytes after that non-digit.
 */
static inline unsigned
omni_digits8(uint64_t v)
{
    uint64_t  x = ((v & 0xf0f0f0f0f0f0f0f0ULL) ^ 0x3030303030303030ULL)
                  | (((v + 0x0606060606060606ULL) & 0xf0f0f0f0f0f0f0f0ULL)
                     ^ 0x3030303030303030ULL);

    return x ? (unsigned) __builtin_ctzll(x) >> 3 : 8;
}


/* The value of the first n (1..8) digits of v (string order). */
static inline uint32_t
omni_parse8(uint64_t v, unsigned n)
{
    v <<= 8 * (8 - n);                  /* zero bytes act as leading zeros */
    v &= 0x0f0f0f0f0f0f0f0fULL;
    v = (v * 10 + (v >> 8)) & 0x00ff00ff00ff00ffULL;
    v = (v * 100 + (v >> 16)) & 0x0000ffff0000ffffULL;
    v = (v * 10000 + (v >> 32)) & 0xffffffffULL;
    return (uint32_t) v;
}

#endif


#if defined(__SSE2__) && defined(OMNI_SWAR)
#define OMNI_INT_BLOCKS  1

/* Bit i of each mask describes p[i]: digit, ',', whitespace, '0'. */
typedef struct {
    uint64_t  d, c, w, z;
} omni_int_masks_t;


static inline void
omni_int_masks(const uint8_t *p, omni_int_masks_t *m)
{
    const __m128i  below0 = _mm_set1_epi8('0' - 1);
    const __m128i  above9 = _mm_set1_epi8('9' + 1);
    int            i;

    m->d = m->c = m->w = m->z = 0;

    for (i = 0; i < 64; i += 16) {
        __m128i  v = _mm_loadu_si128((const __m128i *) (p + i));
        __m128i  d = _mm_and_si128(_mm_cmpgt_epi8(v, below0),
                                   _mm_cmplt_epi8(v, above9));
        __m128i  w = _mm_or_si128(
                         _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8(' ')),
                                      _mm_cmpeq_epi8(v, _mm_set1_epi8('\n'))),
                         _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('\r')),
                                      _mm_cmpeq_epi8(v, _mm_set1_epi8('\t'))));

        m->d |= (uint64_t) (unsigned) _mm_movemask_epi8(d) << i;
        m->w |= (uint64_t) (unsigned) _mm_movemask_epi8(w) << i;
        m->c |= (uint64_t) (unsigned) _mm_movemask_epi8(
                    _mm_cmpeq_epi8(v, _mm_set1_epi8(','))) << i;
        m->z |= (uint64_t) (unsigned) _mm_movemask_epi8(
                    _mm_cmpeq_epi8(v, _mm_set1_epi8('0'))) << i;
    }
}


/*
 * Validate runs of "integer, integer, ..." inside an array 64 bytes at a
 * time, with no per-element work.  p is at the first digit of an element
 * and end - p >= 64.  Each block is committed up to the start of its last
 * digit run (cut), so the next block starts at an element again.  Below
 * cut every byte must be a digit, ',' or whitespace, and:
 *   - the first non-whitespace byte after each ',' is a digit,
 *   - the first non-whitespace byte after each digit run is a ',',
 *   - no run longer than one digit starts with '0'.
 * "First non-whitespace after x" is found for all x at once: adding x's
 * bits to the whitespace mask carries each one over its whitespace run.
 * Returns the new p, an element start; the caller does the rest.
 */
static inline const uint8_t *
omni_int_blocks(const uint8_t *p, const uint8_t *end)
{
    omni_int_masks_t  m;
    uint64_t          starts, ends, below, upto, after_c, after_e, bad;
    unsigned          cut;

    while (end - p >= 64) {
        omni_int_masks(p, &m);

        starts = m.d & ~(m.d << 1);
        if ((starts & ~1ULL) == 0) {
            break;
        }

        cut = 63 - (unsigned) __builtin_clzll(starts);
        below = (1ULL << cut) - 1;
        upto = below | (1ULL << cut);
        ends = m.d & ~(m.d >> 1) & below;

        /* carry chains stop at the digit at cut: nothing overflows */
        after_c = (((m.c & below) << 1) + m.w) & ~m.w;
        after_e = ((ends << 1) + m.w) & ~m.w;

        bad = (~(m.d | m.c | m.w) & below)
              | (after_c & upto & ~m.d)
              | (after_e & upto & ~m.c)
              | (starts & m.z & ~ends & below);
        if (bad) {
            break;
        }

        p += cut;
    }

    return p;
}

#endif


#ifdef __SSE2__

/*
 * One signed compare finds three of the four kinds of special bytes: x ^ 2
 * keeps 0x00-0x1f (controls) inside 0x00-0x1f and every byte >= 0x80
 * negative as int8, moves '"' (0x22) to 0x20, and maps no other byte
 * below 0x21; a second compare finds '\\'.
 */
#define omni_special16(v)                                                    \
    _mm_or_si128(_mm_cmplt_epi8(_mm_xor_si128(v, _mm_set1_epi8(2)),          \
                                _mm_set1_epi8(0x21)),                        \
                 _mm_cmpeq_epi8(v, _mm_set1_epi8('\\')))


#ifdef OMNI_JSON_AVX2

#define omni_special32(v)                                                    \
    _mm256_or_si256(                                                         \
        _mm256_cmpgt_epi8(_mm256_set1_epi8(0x21),                            \
                          _mm256_xor_si256(v, _mm256_set1_epi8(2))),         \
        _mm256_cmpeq_epi8(v, _mm256_set1_epi8('\\')))

/*
 * omni_find_special()'s loop over 128-byte windows with AVX2; returns the
 * special byte, or the first byte of the last (< 128 byte) window, which
 * the caller scans as before.
 */
__attribute__((target("avx2"))) static const uint8_t *
omni_find_special_avx2(const uint8_t *p, const uint8_t *end)
{
    __m256i   sa, sb, sc, sd, any;
    uint64_t  lo, hi;

    while (end - p >= 128) {
        sa = omni_special32(_mm256_loadu_si256((const __m256i *) p));
        sb = omni_special32(_mm256_loadu_si256((const __m256i *) (p + 32)));
        sc = omni_special32(_mm256_loadu_si256((const __m256i *) (p + 64)));
        sd = omni_special32(_mm256_loadu_si256((const __m256i *) (p + 96)));
        any = _mm256_or_si256(_mm256_or_si256(sa, sb),
                              _mm256_or_si256(sc, sd));

        if (omni_unlikely(!_mm256_testz_si256(any, any))) {
            lo = (uint64_t) (uint32_t) _mm256_movemask_epi8(sa)
                 | (uint64_t) (uint32_t) _mm256_movemask_epi8(sb) << 32;
            if (lo) {
                return p + __builtin_ctzll(lo);
            }

            hi = (uint64_t) (uint32_t) _mm256_movemask_epi8(sc)
                 | (uint64_t) (uint32_t) _mm256_movemask_epi8(sd) << 32;

            return p + 64 + __builtin_ctzll(hi);
        }

        p += 128;
    }

    return p;
}

#undef omni_special32

#endif /* OMNI_JSON_AVX2 */

#endif /* __SSE2__ */


/*
 * First byte in [p, end) that is '"', '\\', a control character (< 0x20) or
 * not ASCII (>= 0x80); end if none.
 */
static inline const uint8_t *
omni_find_special(const uint8_t *p, const uint8_t *end)
{
#ifdef __SSE2__
    if (end - p >= 16) {
        /* short strings (keys, roles) end in the first block */
        __m128i   v = _mm_loadu_si128((const __m128i *) p);
        unsigned  m = (unsigned) _mm_movemask_epi8(omni_special16(v));

        if (m) {
            return p + __builtin_ctz(m);
        }

        p += 16;
    }

#ifdef OMNI_JSON_AVX2
    /*
     * A long string: worth the CPU check (a load and a test).  The loops
     * below then find the special byte it stopped at, or scan the rest.
     */
    if (end - p >= 128 && __builtin_cpu_supports("avx2")) {
        p = omni_find_special_avx2(p, end);
    }
#endif

    while (end - p >= 64) {
        __m128i   a = _mm_loadu_si128((const __m128i *) p);
        __m128i   b = _mm_loadu_si128((const __m128i *) (p + 16));
        __m128i   c = _mm_loadu_si128((const __m128i *) (p + 32));
        __m128i   d = _mm_loadu_si128((const __m128i *) (p + 48));
        __m128i   sa = omni_special16(a);
        __m128i   sb = omni_special16(b);
        __m128i   sc = omni_special16(c);
        __m128i   sd = omni_special16(d);
        __m128i   any = _mm_or_si128(_mm_or_si128(sa, sb),
                                     _mm_or_si128(sc, sd));

        if (_mm_movemask_epi8(any)) {
            uint64_t  m = (uint64_t) (unsigned) _mm_movemask_epi8(sa)
                | (uint64_t) (unsigned) _mm_movemask_epi8(sb) << 16
                | (uint64_t) (unsigned) _mm_movemask_epi8(sc) << 32
                | (uint64_t) (unsigned) _mm_movemask_epi8(sd) << 48;

            return p + __builtin_ctzll(m);
        }

        p += 64;
    }

    while (end - p >= 16) {
        __m128i   v = _mm_loadu_si128((const __m128i *) p);
        unsigned  m = (unsigned) _mm_movemask_epi8(omni_special16(v));

        if (m) {
            return p + __builtin_ctz(m);
        }

        p += 16;
    }

#endif

    while (p < end) {
        uint8_t  c = *p;

        if (c < 0x20 || c >= 0x80 || c == '"' || c == '\\') {
            break;
        }

        p++;
    }

    return p;
}


/* First '"' or '\\' in [p, end), or end.  Used on validated strings. */
static inline const uint8_t *
omni_find_quote(const uint8_t *p, const uint8_t *end)
{
#ifdef __SSE2__
    const __m128i  quote = _mm_set1_epi8('"');
    const __m128i  bslash = _mm_set1_epi8('\\');

    while (end - p >= 16) {
        __m128i   v = _mm_loadu_si128((const __m128i *) p);
        unsigned  m = (unsigned) _mm_movemask_epi8(
                          _mm_or_si128(_mm_cmpeq_epi8(v, quote),
                                       _mm_cmpeq_epi8(v, bslash)));

        if (m) {
            return p + __builtin_ctz(m);
        }

        p += 16;
    }
#endif

    while (p < end && *p != '"' && *p != '\\') {
        p++;
    }

    return p;
}


/* First '"', '[', ']', '{' or '}' in [p, end), or end. */
static inline const uint8_t *
omni_find_struct(const uint8_t *p, const uint8_t *end)
{
#ifdef __SSE2__
    const __m128i  quote = _mm_set1_epi8('"');
    const __m128i  lower = _mm_set1_epi8(0x20);
    const __m128i  open = _mm_set1_epi8('{');
    const __m128i  close = _mm_set1_epi8('}');

    while (end - p >= 16) {
        /* '[' | 0x20 == '{' and ']' | 0x20 == '}'; nothing else maps there */
        __m128i   v = _mm_loadu_si128((const __m128i *) p);
        __m128i   f = _mm_or_si128(v, lower);
        unsigned  m = (unsigned) _mm_movemask_epi8(
                          _mm_or_si128(_mm_cmpeq_epi8(v, quote),
                              _mm_or_si128(_mm_cmpeq_epi8(f, open),
                                           _mm_cmpeq_epi8(f, close))));

        if (m) {
            return p + __builtin_ctz(m);
        }

        p += 16;
    }
#endif

    while (p < end) {
        uint8_t  c = *p | 0x20;

        if (*p == '"' || c == '{' || c == '}') {
            break;
        }

        p++;
    }

    return p;
}


/*
 * Length of the well-formed UTF-8 sequence at p (Unicode table 3-7: no
 * overlongs, no surrogates, nothing above U+10FFFF), or 0 when it is not
 * one; then *bad is the length of its maximal valid prefix (at least 1),
 * which is what one U+FFFD replaces.
 */
static inline size_t
omni_utf8_seq(const uint8_t *p, const uint8_t *end, size_t *bad)
{
    uint8_t  c = p[0], lo = 0x80, hi = 0xbf;
    size_t   n, i;

    if (c < 0x80) {
        return 1;
    }

    if (c < 0xc2) {
        *bad = 1;
        return 0;
    }

    if (c < 0xe0) {
        n = 2;

    } else if (c < 0xf0) {
        n = 3;
        if (c == 0xe0) {
            lo = 0xa0;
        } else if (c == 0xed) {
            hi = 0x9f;
        }

    } else if (c < 0xf5) {
        n = 4;
        if (c == 0xf0) {
            lo = 0x90;
        } else if (c == 0xf4) {
            hi = 0x8f;
        }

    } else {
        *bad = 1;
        return 0;
    }

    for (i = 1; i < n; i++) {
        if (p + i >= end || p[i] < lo || p[i] > hi) {
            *bad = i;
            return 0;
        }

        lo = 0x80;
        hi = 0xbf;
    }

    return n;
}


#ifdef __SSE2__

/*
 * Validate UTF-8 16 bytes at a time from p (a character boundary inside a
 * string) while the windows hold no '"', '\\' or control byte and some
 * non-ASCII byte.  Returns where it stopped, always a character boundary;
 * the caller's scalar loop goes on from there and reports any error at its
 * exact offset.  Signed byte compares: bytes >= 0x80 are negative, ordered.
 */
static inline const uint8_t *
omni_utf8_windows(const uint8_t *p, const uint8_t *end)
{
    const __m128i  zero = _mm_setzero_si128();

#define omni_b(c)  _mm_set1_epi8((char) (c))

    while (end - p >= 16) {
        __m128i   v = _mm_loadu_si128((const __m128i *) p);
        __m128i   hi = _mm_cmplt_epi8(v, zero);
        __m128i   ctl = _mm_andnot_si128(hi, _mm_cmplt_epi8(v, omni_b(0x20)));
        __m128i   stop = _mm_or_si128(ctl,
                             _mm_or_si128(_mm_cmpeq_epi8(v, omni_b('"')),
                                          _mm_cmpeq_epi8(v, omni_b('\\'))));
        __m128i   cont, lead, ge_c2, ge_e0, ge_f0, bad, want, prev;
        unsigned  m_lead, m_e0, m_f0;

        if (_mm_movemask_epi8(stop) || !_mm_movemask_epi8(hi)) {
            break;
        }

        cont = _mm_cmplt_epi8(v, omni_b(0xc0));            /* 80..bf */
        lead = _mm_andnot_si128(cont, hi);                 /* c0..ff */
        ge_c2 = _mm_and_si128(hi, _mm_cmpgt_epi8(v, omni_b(0xc1)));
        ge_e0 = _mm_and_si128(hi, _mm_cmpgt_epi8(v, omni_b(0xdf)));
        ge_f0 = _mm_and_si128(hi, _mm_cmpgt_epi8(v, omni_b(0xef)));

        /* c0, c1 and f5..ff never start a sequence */
        bad = _mm_or_si128(_mm_andnot_si128(ge_c2, lead),
                  _mm_and_si128(hi, _mm_cmpgt_epi8(v, omni_b(0xf4))));

        /* continuation bytes exactly where the leads want them */
        want = _mm_or_si128(_mm_slli_si128(lead, 1),
                   _mm_or_si128(_mm_slli_si128(ge_e0, 2),
                                _mm_slli_si128(ge_f0, 3)));
        bad = _mm_or_si128(bad, _mm_xor_si128(want, cont));

        /* overlongs (e0 80..9f, f0 80..8f), surrogates (ed a0..bf), > 10ffff */
        prev = _mm_slli_si128(v, 1);
        bad = _mm_or_si128(bad, _mm_or_si128(
            _mm_or_si128(
                _mm_and_si128(_mm_cmpeq_epi8(prev, omni_b(0xe0)),
                              _mm_cmplt_epi8(v, omni_b(0xa0))),
                _mm_and_si128(_mm_cmpeq_epi8(prev, omni_b(0xed)),
                              _mm_cmpgt_epi8(v, omni_b(0x9f)))),
            _mm_or_si128(
                _mm_and_si128(_mm_cmpeq_epi8(prev, omni_b(0xf0)),
                              _mm_cmplt_epi8(v, omni_b(0x90))),
                _mm_and_si128(_mm_cmpeq_epi8(prev, omni_b(0xf4)),
                              _mm_cmpgt_epi8(v, omni_b(0x8f))))));

        if (_mm_movemask_epi8(bad)) {
            break;
        }

        /* stop before a sequence that runs past the window */
        m_lead = (unsigned) _mm_movemask_epi8(lead);
        m_e0 = (unsigned) _mm_movemask_epi8(ge_e0);
        m_f0 = (unsigned) _mm_movemask_epi8(ge_f0);

        if (m_f0 & 0x2000) {
            p += 13;
        } else if (m_e0 & 0x4000) {
            p += 14;
        } else if (m_lead & 0x8000) {
            p += 15;
        } else {
            p += 16;
        }
    }

#undef omni_b

    return p;
}

#endif


/*
 * The body of a string: p is just after the opening quote.  Returns the
 * position after the closing quote, or NULL with *e set.  *escaped is set
 * when a backslash escape was seen.
 */
static inline const uint8_t *
omni_scan_string(const uint8_t *p, const uint8_t *end, int *escaped,
    omni_json_err_t *e)
{
    size_t  n, bad;

    for ( ;; ) {
        p = omni_find_special(p, end);

        if (omni_unlikely(p >= end)) {
            e->at = end;
            e->msg = "unterminated string";
            return NULL;
        }

        if (omni_likely(*p == '"')) {
            return p + 1;
        }

        if (*p == '\\') {
            *escaped = 1;

            if (end - p < 2) {
                e->at = end;
                e->msg = "unterminated string";
                return NULL;
            }

            switch (p[1]) {
            case '"': case '\\': case '/': case 'b':
            case 'f': case 'n': case 'r': case 't':
                p += 2;
                continue;

            case 'u':
                /* lone surrogates are accepted, as Python's json does */
                if (end - p >= 6
                    && (omni_hex[p[2]] & omni_hex[p[3]] & omni_hex[p[4]]
                        & omni_hex[p[5]] & 0x10))
                {
                    p += 6;
                    continue;
                }

                e->at = p;
                e->msg = "invalid \\u escape";
                return NULL;
            }

            e->at = p;
            e->msg = "invalid escape";
            return NULL;
        }

        if (*p < 0x20) {
            e->at = p;
            e->msg = "control character in string";
            return NULL;
        }

        /* non-ASCII: whole windows, then character by character */
#ifdef __SSE2__
        p = omni_utf8_windows(p, end);
#endif
        while (p < end && *p >= 0x80) {
            n = omni_utf8_seq(p, end, &bad);
            if (omni_unlikely(n == 0)) {
                e->at = p;
                e->msg = "invalid UTF-8";
                return NULL;
            }

            p += n;
        }
    }
}


/* The end of the run of ASCII digits at p. */
static inline const uint8_t *
omni_skip_digits(const uint8_t *p, const uint8_t *end)
{
#ifdef OMNI_SWAR
    while (end - p >= 8) {
        unsigned  n = omni_digits8(omni_load64(p));

        p += n;
        if (n < 8) {
            return p;
        }
    }
#endif

    while (p < end && omni_is_digit(*p)) {
        p++;
    }

    return p;
}


/* A number (RFC 8259 grammar) at p; returns its end or NULL. */
static inline const uint8_t *
omni_scan_number(const uint8_t *p, const uint8_t *end, omni_json_err_t *e)
{
    const uint8_t  *start = p;

    if (*p == '-') {
        p++;
    }

    if (p < end && *p == '0') {
        p++;

    } else if (p < end && omni_is_digit(*p)) {
        p = omni_skip_digits(p + 1, end);

    } else {
        goto invalid;
    }

    if (p < end && *p == '.') {
        p++;
        if (p >= end || !omni_is_digit(*p)) {
            goto invalid;
        }

        p = omni_skip_digits(p, end);
    }

    if (p < end && (*p | 0x20) == 'e') {
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }

        if (p >= end || !omni_is_digit(*p)) {
            goto invalid;
        }

        while (p < end && omni_is_digit(*p)) {
            p++;
        }
    }

    return p;

invalid:

    e->at = start;
    e->msg = "invalid number";
    return NULL;
}


static inline int
omni_type_of(uint8_t c)
{
    switch (c) {
    case '{': return OMNI_JSON_OBJECT;
    case '[': return OMNI_JSON_ARRAY;
    case '"': return OMNI_JSON_STRING;
    case 't': return OMNI_JSON_TRUE;
    case 'f': return OMNI_JSON_FALSE;
    case 'n': return OMNI_JSON_NULL;
    }

    return OMNI_JSON_NUMBER;
}


/*
 * One complete value at p (p < end, not whitespace), nested `depth` levels
 * deep already.  Iterative: the kind of each open container is one bit of
 * `stack` (1 = object).  Returns the end of the value or NULL with *e set.
 */
static const uint8_t *
omni_scan_value(const uint8_t *p, const uint8_t *end, uint32_t depth,
    uint32_t max_depth, omni_json_err_t *e)
{
    uint64_t   stack[OMNI_JSON_MAX_DEPTH_LIMIT / 64];
    uint32_t   base = depth, level;
    int        in_obj = 0, escaped, ints = 1;

#ifndef OMNI_INT_BLOCKS
    (void) ints;
#endif

value:

    switch (*p) {

    case '"':
        p = omni_scan_string(p + 1, end, &escaped, e);
        if (p == NULL) {
            return NULL;
        }
        break;

    case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
#ifdef OMNI_SWAR
        /*
         * Integer arrays (token-id prompts): take "digits, ws" runs 8 bytes
         * at a time; anything else (last element, '-', '.', 'e', 9+ digits,
         * a leading zero) goes through omni_scan_number() below.
         */
        if (depth > base && !in_obj) {
#ifdef OMNI_INT_BLOCKS
            /* after one miss (floats, negatives) stop trying in this array */
            if (ints && end - p >= 64) {
                const uint8_t  *q = omni_int_blocks(p, end);

                ints = (q != p);
                p = q;
            }
#endif
            while (end - p >= 16) {
                unsigned  n = omni_digits8(omni_load64(p));

                if (n == 8 || p[n] != ',' || (n > 1 && *p == '0')) {
                    break;
                }

                p += n + 1;
                if (omni_is_ws(*p)) {
                    p = omni_skip_ws(p + 1, end);
                    if (p >= end) {
                        goto eof;
                    }
                }

                if (!omni_is_digit(*p)) {
                    goto value;
                }
            }
        }
#endif
        /* fall through */

    case '-':
        p = omni_scan_number(p, end, e);
        if (p == NULL) {
            return NULL;
        }
        break;

    case '{':
    case '[':
        if (omni_unlikely(depth >= max_depth)) {
            e->at = p;
            e->msg = "nesting too deep";
            e->rc = OMNI_EDEPTH;
            return NULL;
        }

        /*
         * Set this level's bit.  Levels are entered in order, so a word is
         * always initialised (at its level 0) before its other bits are.
         */
        level = depth++ - base;
        in_obj = (*p == '{');
        ints = 1;                       /* a new array may hold integers */
        if ((level & 63) == 0) {
            stack[level >> 6] = (uint64_t) in_obj;
        } else {
            stack[level >> 6] = (stack[level >> 6] & ~(1ULL << (level & 63)))
                                | (uint64_t) in_obj << (level & 63);
        }

        p = omni_skip_ws(p + 1, end);
        if (p >= end) {
            goto eof;
        }

        if (*p == (in_obj ? '}' : ']')) {
            p++;
            goto close;
        }

        if (in_obj) {
            goto key;
        }

        goto value;

    case 't':
        if (end - p >= 4 && memcmp(p, "true", 4) == 0) {
            p += 4;
            break;
        }
        goto literal;

    case 'f':
        if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
            p += 5;
            break;
        }
        goto literal;

    case 'n':
        if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
            p += 4;
            break;
        }
        goto literal;

    default:
        e->at = p;
        e->msg = (*p == ']' || *p == '}') ? "expected a value (trailing comma?)"
                                          : "unexpected byte";
        return NULL;
    }

after:

    if (depth == base) {
        return p;
    }

    if (p < end && omni_is_ws(*p)) {
        p = omni_skip_ws(p + 1, end);
    }

    if (omni_unlikely(p >= end)) {
        goto eof;
    }

    if (*p == ',') {
        p++;
        if (p < end && omni_is_ws(*p)) {
            p = omni_skip_ws(p + 1, end);
        }

        if (p >= end) {
            goto eof;
        }

        if (in_obj) {
            goto key;
        }

        goto value;
    }

    if (*p == (in_obj ? '}' : ']')) {
        p++;
        goto close;
    }

    e->at = p;
    e->msg = in_obj ? "expected ',' or '}'" : "expected ',' or ']'";
    return NULL;

close:

    depth--;
    if (depth > base) {
        level = depth - base - 1;
        in_obj = (stack[level >> 6] >> (level & 63)) & 1;
    }

    goto after;

key:

    if (*p != '"') {
        e->at = p;
        e->msg = (*p == '}') ? "expected a key (trailing comma?)"
                             : "expected a string key";
        return NULL;
    }

    p = omni_scan_string(p + 1, end, &escaped, e);
    if (p == NULL) {
        return NULL;
    }

    p = omni_skip_ws(p, end);
    if (p >= end) {
        goto eof;
    }

    if (*p != ':') {
        e->at = p;
        e->msg = "expected ':'";
        return NULL;
    }

    p = omni_skip_ws(p + 1, end);
    if (p >= end) {
        goto eof;
    }

    goto value;

literal:

    e->at = p;
    e->msg = "invalid literal";
    return NULL;

eof:

    e->at = end;
    e->msg = "unexpected end of input";
    return NULL;
}


int
omni_json_scan(const uint8_t *buf, size_t len, uint32_t max_depth,
    omni_json_member_t *members, size_t cap, omni_json_doc_t *doc)
{
    const uint8_t       *p, *end, *key, *val;
    omni_json_err_t      e;
    omni_json_member_t  *m;
    uint32_t             n;
    int                  escaped;

    if (doc == NULL) {
        return OMNI_EINVAL;
    }

    memset(doc, 0, sizeof(omni_json_doc_t));

    if (buf == NULL || (members == NULL && cap != 0) || len > UINT32_MAX
        || max_depth > OMNI_JSON_MAX_DEPTH_LIMIT)
    {
        doc->err_msg = "invalid argument";
        return OMNI_EINVAL;
    }

    if (max_depth == 0) {
        max_depth = OMNI_JSON_DEFAULT_MAX_DEPTH;
    }

    e.rc = OMNI_EJSON;
    e.at = buf;
    e.msg = NULL;

    end = buf + len;
    p = omni_skip_ws(buf, end);

    if (p >= end) {
        e.at = end;
        e.msg = "empty document";
        goto failed;
    }

    doc->root_off = (uint32_t) (p - buf);
    doc->type = (uint8_t) omni_type_of(*p);

    if (*p != '{') {
        p = omni_scan_value(p, end, 0, max_depth, &e);
        if (p == NULL) {
            goto failed;
        }

        goto done;
    }

    /* the top-level object: the one place members are recorded */

    n = 0;
    p = omni_skip_ws(p + 1, end);
    if (p >= end) {
        goto eof;
    }

    if (*p == '}') {
        p++;
        goto done;
    }

    for ( ;; ) {
        if (*p != '"') {
            e.at = p;
            e.msg = (*p == '}') ? "expected a key (trailing comma?)"
                                : "expected a string key";
            goto failed;
        }

        key = p;
        escaped = 0;
        p = omni_scan_string(p + 1, end, &escaped, &e);
        if (p == NULL) {
            goto failed;
        }

        m = NULL;
        if (n < cap) {
            m = &members[n];
            m->key_off = (uint32_t) (key - buf);
            m->key_len = (uint32_t) (p - key);
            m->key_escaped = (uint8_t) escaped;
        }

        p = omni_skip_ws(p, end);
        if (p >= end) {
            goto eof;
        }

        if (*p != ':') {
            e.at = p;
            e.msg = "expected ':'";
            goto failed;
        }

        p = omni_skip_ws(p + 1, end);
        if (p >= end) {
            goto eof;
        }

        val = p;
        p = omni_scan_value(p, end, 1, max_depth, &e);
        if (p == NULL) {
            goto failed;
        }

        if (m) {
            m->val_off = (uint32_t) (val - buf);
            m->val_len = (uint32_t) (p - val);
            m->type = (uint8_t) omni_type_of(*val);
        }

        doc->n_members = ++n;

        p = omni_skip_ws(p, end);
        if (p >= end) {
            goto eof;
        }

        if (*p == ',') {
            p = omni_skip_ws(p + 1, end);
            if (p >= end) {
                goto eof;
            }

            continue;
        }

        if (*p == '}') {
            p++;
            break;
        }

        e.at = p;
        e.msg = "expected ',' or '}'";
        goto failed;
    }

done:

    doc->root_len = (uint32_t) (p - buf) - doc->root_off;

    p = omni_skip_ws(p, end);
    if (p != end) {
        e.at = p;
        e.msg = "extra data after the value";
        goto failed;
    }

    return doc->n_members > cap ? OMNI_ERANGE : OMNI_OK;

eof:

    e.at = end;
    e.msg = "unexpected end of input";

failed:

    doc->err_off = (uint32_t) (e.at - buf);
    doc->err_msg = e.msg;
    return e.rc;
}


/* ---- decoding helpers ---------------------------------------------------- */


static inline size_t
omni_utf8_put(uint32_t cp, uint8_t *out)
{
    if (cp < 0x80) {
        out[0] = (uint8_t) cp;
        return 1;
    }

    if (cp < 0x800) {
        out[0] = (uint8_t) (0xc0 | (cp >> 6));
        out[1] = (uint8_t) (0x80 | (cp & 0x3f));
        return 2;
    }

    if (cp < 0x10000) {
        /* lone surrogates land here too: their 3-byte (WTF-8) form */
        out[0] = (uint8_t) (0xe0 | (cp >> 12));
        out[1] = (uint8_t) (0x80 | ((cp >> 6) & 0x3f));
        out[2] = (uint8_t) (0x80 | (cp & 0x3f));
        return 3;
    }

    out[0] = (uint8_t) (0xf0 | (cp >> 18));
    out[1] = (uint8_t) (0x80 | ((cp >> 12) & 0x3f));
    out[2] = (uint8_t) (0x80 | ((cp >> 6) & 0x3f));
    out[3] = (uint8_t) (0x80 | (cp & 0x3f));
    return 4;
}


static inline int
omni_hex4(const uint8_t *p, uint32_t *cp)
{
    uint8_t  a = omni_hex[p[0]], b = omni_hex[p[1]];
    uint8_t  c = omni_hex[p[2]], d = omni_hex[p[3]];

    if (!(a & b & c & d & 0x10)) {
        return 0;
    }

    *cp = (uint32_t) (a & 0xf) << 12 | (uint32_t) (b & 0xf) << 8
          | (uint32_t) (c & 0xf) << 4 | (uint32_t) (d & 0xf);
    return 1;
}


/*
 * The escape at p (p[0] == '\\', p < end): its UTF-8 bytes go to out[0, 4),
 * *olen says how many.  Returns the raw bytes consumed, 0 when malformed.
 * A high surrogate followed by a low one is one code point.
 */
static size_t
omni_decode_escape(const uint8_t *p, const uint8_t *end, uint8_t *out,
    size_t *olen)
{
    uint32_t  cp, lo;

    if (end - p < 2) {
        return 0;
    }

    switch (p[1]) {
    case '"':  out[0] = '"';  break;
    case '\\': out[0] = '\\'; break;
    case '/':  out[0] = '/';  break;
    case 'b':  out[0] = '\b'; break;
    case 'f':  out[0] = '\f'; break;
    case 'n':  out[0] = '\n'; break;
    case 'r':  out[0] = '\r'; break;
    case 't':  out[0] = '\t'; break;

    case 'u':
        if (end - p < 6 || !omni_hex4(p + 2, &cp)) {
            return 0;
        }

        if (cp >= 0xd800 && cp < 0xdc00 && end - p >= 12 && p[6] == '\\'
            && p[7] == 'u' && omni_hex4(p + 8, &lo)
            && lo >= 0xdc00 && lo < 0xe000)
        {
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            *olen = omni_utf8_put(cp, out);
            return 12;
        }

        *olen = omni_utf8_put(cp, out);
        return 6;

    default:
        return 0;
    }

    *olen = 1;
    return 2;
}


/* Does the raw string body s[0, n) (no quotes) decode to key[0, key_len)? */
static int
omni_key_eq(const uint8_t *s, size_t n, const uint8_t *key, size_t key_len)
{
    const uint8_t  *e = s + n, *b;
    uint8_t         tmp[4];
    size_t          run, used, olen;

    while (s < e) {
        b = memchr(s, '\\', (size_t) (e - s));
        run = (b ? b : e) - s;

        if (run > key_len || memcmp(s, key, run) != 0) {
            return 0;
        }

        key += run;
        key_len -= run;
        s += run;

        if (b == NULL) {
            break;
        }

        used = omni_decode_escape(s, e, tmp, &olen);
        if (used == 0 || olen > key_len || memcmp(tmp, key, olen) != 0) {
            return 0;
        }

        key += olen;
        key_len -= olen;
        s += used;
    }

    return key_len == 0;
}


static inline int
omni_member_is(const uint8_t *buf, const omni_json_member_t *m,
    const uint8_t *key, size_t key_len)
{
    const uint8_t  *s = buf + m->key_off + 1;
    size_t          n = m->key_len - 2;

    if (!m->key_escaped) {
        return n == key_len && (n == 0 || memcmp(s, key, n) == 0);
    }

    /* an escape shortens the text: it cannot decode to anything longer */
    return n >= key_len && omni_key_eq(s, n, key, key_len);
}


long
omni_json_find(const uint8_t *buf, const omni_json_member_t *members,
    size_t n, const char *key, size_t key_len)
{
    size_t  i;

    if (buf == NULL || members == NULL || (key == NULL && key_len != 0)) {
        return -1;
    }

    for (i = n; i-- > 0; ) {
        if (members[i].key_len >= 2
            && omni_member_is(buf, &members[i], (const uint8_t *) key,
                              key_len))
        {
            return (long) i;
        }
    }

    return -1;
}


/* ---- nested reads on validated spans ------------------------------------ */


/* p just after an opening quote; returns after the closing one, or NULL. */
static const uint8_t *
omni_skip_string(const uint8_t *p, const uint8_t *end)
{
    for ( ;; ) {
        p = omni_find_quote(p, end);
        if (p >= end) {
            return NULL;
        }

        if (*p == '"') {
            return p + 1;
        }

        p += 2;     /* the escaped byte is never a quote that ends it */
        if (p > end) {
            return NULL;
        }
    }
}


/* The value at p (p < end): returns its end, or NULL when malformed. */
static const uint8_t *
omni_skip_value(const uint8_t *p, const uint8_t *end)
{
    size_t  depth;

    switch (*p) {

    case '"':
        return omni_skip_string(p + 1, end);

    case '{':
    case '[':
        depth = 0;
        for ( ;; ) {
            p = omni_find_struct(p, end);
            if (p >= end) {
                return NULL;
            }

            if (*p == '"') {
                p = omni_skip_string(p + 1, end);
                if (p == NULL) {
                    return NULL;
                }

                continue;
            }

            if (*p == '{' || *p == '[') {
                depth++;

            } else if (--depth == 0) {
                return p + 1;
            }

            p++;
        }

    case ',': case ':': case ']': case '}':
        return NULL;
    }

    /* a number or literal: up to the next delimiter */
    while (p < end && !omni_is_ws(*p) && *p != ',' && *p != ']' && *p != '}') {
        p++;
    }

    return p;
}


/*
 * Iterate over a container: *pp is at its opening bracket (after whitespace)
 * on the first call, after the previous element otherwise.  Sets the next
 * element's key span (objects) and value start; returns 1, 0 at the end,
 * -1 when malformed.
 */
static int
omni_next(const uint8_t **pp, const uint8_t *end, int first, int obj,
    const uint8_t **ks, const uint8_t **ke, const uint8_t **vs)
{
    const uint8_t  *p = *pp;

    p = omni_skip_ws(first ? p + 1 : p, end);
    if (p >= end) {
        return -1;
    }

    if (*p == (obj ? '}' : ']')) {
        return 0;
    }

    if (!first) {
        if (*p != ',') {
            return -1;
        }

        p = omni_skip_ws(p + 1, end);
        if (p >= end) {
            return -1;
        }
    }

    if (obj) {
        if (*p != '"') {
            return -1;
        }

        *ks = p + 1;
        p = omni_skip_string(p + 1, end);
        if (p == NULL) {
            return -1;
        }

        *ke = p - 1;
        p = omni_skip_ws(p, end);
        if (p >= end || *p != ':') {
            return -1;
        }

        p = omni_skip_ws(p + 1, end);
        if (p >= end) {
            return -1;
        }
    }

    *vs = p;
    *pp = p;
    return 1;
}


/* Skip leading whitespace of a span and check its opening byte. */
static const uint8_t *
omni_span_open(const uint8_t *buf, size_t off, size_t len, uint8_t want,
    const uint8_t **end)
{
    const uint8_t  *p;

    if (buf == NULL || off + len < off) {
        return NULL;
    }

    p = buf + off;
    *end = p + len;
    p = omni_skip_ws(p, *end);

    if (p >= *end || *p != want) {
        return NULL;
    }

    return p;
}


int
omni_json_object_get(const uint8_t *buf, size_t off, size_t len,
    const char *key, size_t key_len, size_t *vo, size_t *vl, int *type)
{
    const uint8_t  *p, *end, *ks, *ke, *vs, *ve, *fs = NULL, *fe = NULL;
    int             rc, first;

    if (vo == NULL || vl == NULL || type == NULL
        || (key == NULL && key_len != 0))
    {
        return OMNI_EINVAL;
    }

    p = omni_span_open(buf, off, len, '{', &end);
    if (p == NULL) {
        return buf == NULL ? OMNI_EINVAL : OMNI_ETYPE;
    }

    for (first = 1; ; first = 0) {
        ks = ke = NULL;
        rc = omni_next(&p, end, first, 1, &ks, &ke, &vs);
        if (rc <= 0) {
            break;
        }

        ve = omni_skip_value(vs, end);
        if (ve == NULL) {
            return OMNI_EJSON;
        }

        if ((size_t) (ke - ks) >= key_len
            && (memchr(ks, '\\', (size_t) (ke - ks))
                ? omni_key_eq(ks, (size_t) (ke - ks), (const uint8_t *) key,
                              key_len)
                : ((size_t) (ke - ks) == key_len
                   && (key_len == 0 || memcmp(ks, key, key_len) == 0))))
        {
            fs = vs;    /* keep going: the last duplicate wins */
            fe = ve;
        }

        p = ve;
    }

    if (rc < 0) {
        return OMNI_EJSON;
    }

    if (fs == NULL) {
        return OMNI_ENOTFOUND;
    }

    *vo = (size_t) (fs - buf);
    *vl = (size_t) (fe - fs);
    *type = omni_type_of(*fs);
    return OMNI_OK;
}


int
omni_json_array_get(const uint8_t *buf, size_t off, size_t len,
    size_t index, size_t *vo, size_t *vl, int *type)
{
    const uint8_t  *p, *end, *ks, *ke, *vs, *ve;
    size_t          i;
    int             rc;

    if (vo == NULL || vl == NULL || type == NULL) {
        return OMNI_EINVAL;
    }

    p = omni_span_open(buf, off, len, '[', &end);
    if (p == NULL) {
        return buf == NULL ? OMNI_EINVAL : OMNI_ETYPE;
    }

    for (i = 0; ; i++) {
        rc = omni_next(&p, end, i == 0, 0, &ks, &ke, &vs);
        if (rc < 0) {
            return OMNI_EJSON;
        }

        if (rc == 0) {
            return OMNI_ENOTFOUND;
        }

        ve = omni_skip_value(vs, end);
        if (ve == NULL) {
            return OMNI_EJSON;
        }

        if (i == index) {
            *vo = (size_t) (vs - buf);
            *vl = (size_t) (ve - vs);
            *type = omni_type_of(*vs);
            return OMNI_OK;
        }

        p = ve;
    }
}


int
omni_json_array_count(const uint8_t *buf, size_t off, size_t len,
    size_t *n)
{
    const uint8_t  *p, *end, *ks, *ke, *vs;
    size_t          i;
    int             rc;

    if (n == NULL) {
        return OMNI_EINVAL;
    }

    p = omni_span_open(buf, off, len, '[', &end);
    if (p == NULL) {
        return buf == NULL ? OMNI_EINVAL : OMNI_ETYPE;
    }

    for (i = 0; ; i++) {
        rc = omni_next(&p, end, i == 0, 0, &ks, &ke, &vs);
        if (rc < 0) {
            return OMNI_EJSON;
        }

        if (rc == 0) {
            *n = i;
            return OMNI_OK;
        }

        p = omni_skip_value(vs, end);
        if (p == NULL) {
            return OMNI_EJSON;
        }
    }
}


int
omni_json_u32_array(const uint8_t *buf, size_t off, size_t len,
    uint32_t *out, size_t cap, size_t *n)
{
    const uint8_t  *p, *end;
    uint64_t        v;
    size_t          count = 0;
    int             neg;

    if (n == NULL || (out == NULL && cap != 0)) {
        return OMNI_EINVAL;
    }

    *n = 0;

    p = omni_span_open(buf, off, len, '[', &end);
    if (p == NULL) {
        return buf == NULL ? OMNI_EINVAL : OMNI_ETYPE;
    }

    p = omni_skip_ws(p + 1, end);
    if (p < end && *p == ']') {
        return OMNI_OK;
    }

    /* token-id prompts: "[1, 2, 3, ...]" with 100k elements are common */

    for ( ;; ) {
#ifdef OMNI_INT_BLOCKS
        /*
         * Blocks of plain integers (see omni_int_blocks()): find every
         * element of a block from bit masks, then parse them independently.
         * The +8 keeps the 8-byte loads of the last element in bounds.
         */
        while (end - p >= 64 + 8 && omni_is_digit(*p)) {
            omni_int_masks_t  mk;
            uint64_t          st, en, below;
            unsigned          cut, a, b, len;

            omni_int_masks(p, &mk);
            st = mk.d & ~(mk.d << 1);
            if ((st & ~1ULL) == 0) {
                break;
            }

            cut = 63 - (unsigned) __builtin_clzll(st);
            below = (1ULL << cut) - 1;
            if (~(mk.d | mk.c | mk.w) & below) {
                break;                  /* '-', '.', 'e', ...: slow path */
            }

            st &= below;
            en = mk.d & ~(mk.d >> 1) & below;

            while (st) {
                a = (unsigned) __builtin_ctzll(st);
                b = (unsigned) __builtin_ctzll(en);
                len = b - a + 1;

                if (len <= 8) {
                    v = omni_parse8(omni_load64(p + a), len);

                } else if (len <= 10) {
                    v = omni_parse8(omni_load64(p + a), 8);
                    v = v * 10 + (uint64_t) (p[a + 8] - '0');
                    if (len == 10) {
                        v = v * 10 + (uint64_t) (p[a + 9] - '0');
                    }

                    if (v > UINT32_MAX) {
                        return OMNI_ETYPE;
                    }

                } else {
                    return OMNI_ETYPE;
                }

                if (count < cap) {
                    out[count] = (uint32_t) v;
                }

                count++;
                st &= st - 1;
                en &= en - 1;
            }

            p += cut;
        }
#endif

#ifdef OMNI_SWAR
        /* "digits," runs of up to 7 digits, 8 bytes at a time */
        while (end - p >= 16) {
            uint64_t  w = omni_load64(p);
            unsigned  k = omni_digits8(w);

            if (k == 0 || k == 8 || p[k] != ',') {
                break;
            }

            if (count < cap) {
                out[count] = omni_parse8(w, k);
            }

            count++;
            p += k + 1;
            if (omni_is_ws(*p)) {
                p = omni_skip_ws(p + 1, end);
            }
        }
#endif

        if (p >= end) {
            return OMNI_EJSON;
        }

        neg = (*p == '-');
        p += neg;

        if (p >= end || !omni_is_digit(*p)) {
            return OMNI_ETYPE;
        }

        v = (uint64_t) (*p++ - '0');

        while (p < end && omni_is_digit(*p)) {
            v = v * 10 + (uint64_t) (*p++ - '0');
            if (v > UINT32_MAX) {
                return OMNI_ETYPE;
            }
        }

        if (p < end && (*p == '.' || (*p | 0x20) == 'e')) {
            return OMNI_ETYPE;
        }

        if (neg && v != 0) {
            return OMNI_ETYPE;
        }

        if (count < cap) {
            out[count] = (uint32_t) v;
        }

        count++;

        if (p < end && *p == ',') {
            p++;

        } else {
            p = omni_skip_ws(p, end);
            if (p >= end) {
                return OMNI_EJSON;
            }

            if (*p == ']') {
                break;
            }

            if (*p != ',') {
                return OMNI_EJSON;
            }

            p++;
        }

        if (p < end && omni_is_ws(*p)) {
            p = omni_skip_ws(p + 1, end);
        }
    }

    *n = count;
    return count > cap ? OMNI_ERANGE : OMNI_OK;
}


int
omni_json_int64(const uint8_t *buf, size_t off, size_t len, int64_t *v)
{
    const uint8_t  *p, *end, *ds, *de, *fs, *fe;
    int64_t         exp = 0, scale;
    uint64_t        acc, limit;
    size_t          nd;
    int             neg = 0, eneg = 0;

    if (buf == NULL || v == NULL || off + len < off) {
        return OMNI_EINVAL;
    }

    p = buf + off;
    end = p + len;
    p = omni_skip_ws(p, end);
    while (end > p && omni_is_ws(end[-1])) {
        end--;
    }

    if (p >= end || (*p != '-' && !omni_is_digit(*p))) {
        return OMNI_ETYPE;
    }

    if (*p == '-') {
        neg = 1;
        p++;
    }

    /* digits: integer part [ds, de), fraction [fs, fe) */

    ds = p;
    while (p < end && omni_is_digit(*p)) {
        p++;
    }

    de = p;
    fs = fe = p;

    if (ds == de) {
        return OMNI_EJSON;
    }

    if (p < end && *p == '.') {
        fs = ++p;
        while (p < end && omni_is_digit(*p)) {
            p++;
        }

        fe = p;
    }

    if (p < end && (*p | 0x20) == 'e') {
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            eneg = (*p == '-');
            p++;
        }

        if (p >= end || !omni_is_digit(*p)) {
            return OMNI_EJSON;
        }

        while (p < end && omni_is_digit(*p)) {
            if (exp < ((int64_t) 1 << 40)) {    /* saturate: any more is */
                exp = exp * 10 + (*p - '0');    /* out of range anyway   */
            }
            p++;
        }

        if (eneg) {
            exp = -exp;
        }
    }

    if (p != end) {
        return OMNI_EJSON;
    }

    /*
     * The value is D * 10^scale where D is the digit string integer part +
     * fraction without leading and trailing zeros.  It is integral when
     * scale >= 0 after the trailing zeros moved into the scale.
     */

    scale = exp - (int64_t) (fe - fs);     /* before any stripping */

    while (ds < de && *ds == '0') {
        ds++;
    }

    if (ds == de) {
        /* no integer digits left: strip the fraction's leading zeros */
        while (fs < fe && *fs == '0') {
            fs++;
        }
    }

    while (fe > fs && fe[-1] == '0') {
        fe--;
        scale++;
    }

    if (fe == fs) {
        while (de > ds && de[-1] == '0') {
            de--;
            scale++;
        }
    }

    nd = (size_t) (de - ds) + (size_t) (fe - fs);
    if (nd == 0) {
        *v = 0;                                 /* zero, whatever the scale */
        return OMNI_OK;
    }

    if (scale < 0) {
        return OMNI_ETYPE;                      /* has a fraction */
    }

    if ((int64_t) nd + scale > 19) {
        return OMNI_ETYPE;                      /* >= 10^19: out of range */
    }

    acc = 0;
    for (p = ds; p < de; p++) {
        acc = acc * 10 + (uint64_t) (*p - '0');
    }

    for (p = fs; p < fe; p++) {
        acc = acc * 10 + (uint64_t) (*p - '0');
    }

    /* nd + scale <= 19 digits: fits uint64, but each step must stay so */
    limit = neg ? (uint64_t) INT64_MAX + 1 : (uint64_t) INT64_MAX;

    for ( ; scale > 0; scale--) {
        if (acc > limit / 10) {
            return OMNI_ETYPE;
        }
        acc *= 10;
    }

    if (acc > limit) {
        return OMNI_ETYPE;
    }

    *v = neg ? (int64_t) (0 - acc) : (int64_t) acc;
    return OMNI_OK;
}


/* Bounded copy into out[0, cap) at *pos; *pos counts what was needed. */
static inline void
omni_put(uint8_t *out, size_t cap, size_t *pos, const uint8_t *src, size_t n)
{
    if (*pos < cap) {
        size_t  room = cap - *pos;

        memcpy(out + *pos, src, n < room ? n : room);
    }

    *pos += n;
}


int
omni_json_string_decode(const uint8_t *buf, size_t off, size_t len,
    uint8_t *out, size_t cap, size_t *n)
{
    const uint8_t  *p, *end, *b;
    uint8_t         tmp[4];
    size_t          pos = 0, used, olen;

    if (buf == NULL || n == NULL || (out == NULL && cap != 0)
        || off + len < off)
    {
        return OMNI_EINVAL;
    }

    *n = 0;
    p = buf + off;
    end = p + len;

    if (len < 2 || *p != '"') {
        return OMNI_ETYPE;
    }

    if (end[-1] != '"') {
        return OMNI_EJSON;
    }

    p++;
    end--;

    while (p < end) {
        b = memchr(p, '\\', (size_t) (end - p));
        if (b == NULL) {
            omni_put(out, cap, &pos, p, (size_t) (end - p));
            break;
        }

        omni_put(out, cap, &pos, p, (size_t) (b - p));

        used = omni_decode_escape(b, end, tmp, &olen);
        if (used == 0) {
            return OMNI_EJSON;
        }

        omni_put(out, cap, &pos, tmp, olen);
        p = b + used;
    }

    *n = pos;
    return pos > cap ? OMNI_ERANGE : OMNI_OK;
}


int
omni_json_string_encode(const uint8_t *in, size_t len, uint8_t *out,
    size_t cap, size_t *n)
{
    static const uint8_t  hexd[] = "0123456789abcdef";
    static const uint8_t  fffd[] = { 0xef, 0xbf, 0xbd };
    const uint8_t        *p, *end, *q;
    uint8_t               esc[6];
    size_t                pos = 0, k, bad = 0;

    if (n == NULL || (in == NULL && len != 0) || (out == NULL && cap != 0)) {
        return OMNI_EINVAL;
    }

    p = in;
    end = in + len;
    omni_put(out, cap, &pos, (const uint8_t *) "\"", 1);

    while (p < end) {
        q = omni_find_special(p, end);
        omni_put(out, cap, &pos, p, (size_t) (q - p));
        p = q;

        if (p >= end) {
            break;
        }

        if (*p >= 0x80) {
            k = omni_utf8_seq(p, end, &bad);
            if (k) {
                omni_put(out, cap, &pos, p, k);
                p += k;
            } else {
                omni_put(out, cap, &pos, fffd, 3);
                p += bad;
            }
            continue;
        }

        esc[0] = '\\';
        switch (*p) {
        case '"':  esc[1] = '"';  k = 2; break;
        case '\\': esc[1] = '\\'; k = 2; break;
        case '\b': esc[1] = 'b';  k = 2; break;
        case '\f': esc[1] = 'f';  k = 2; break;
        case '\n': esc[1] = 'n';  k = 2; break;
        case '\r': esc[1] = 'r';  k = 2; break;
        case '\t': esc[1] = 't';  k = 2; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hexd[*p >> 4];
            esc[5] = hexd[*p & 0xf];
            k = 6;
        }

        omni_put(out, cap, &pos, esc, k);
        p++;
    }

    omni_put(out, cap, &pos, (const uint8_t *) "\"", 1);

    *n = pos;
    return pos > cap ? OMNI_ERANGE : OMNI_OK;
}


/* ---- splicing ----------------------------------------------------------- */


/* Output sink shared by plan (segments) and apply (one buffer). */
typedef struct {
    omni_json_seg_t  *segs;         /* plan: segments, cap entries */
    size_t            cap;
    size_t            nseg;
    const uint8_t    *last_ptr;     /* plan: the open segment, for merging */
    size_t            last_len;
    uint8_t          *out;          /* apply: the buffer, out_cap bytes */
    size_t            out_cap;
    uint8_t          *scratch;      /* plan: where escaped keys go */
    size_t            scratch_cap;
    size_t            scratch_used;
    size_t            total;        /* output length so far */
    int               short_scratch;
} omni_json_sink_t;


/* ",\":" holds every piece of punctuation an appended member needs */
static const uint8_t  omni_punct[] = ",\":";
#define OMNI_P_COMMA        omni_punct, 1
#define OMNI_P_COMMA_QUOTE  omni_punct, 2
#define OMNI_P_QUOTE        omni_punct + 1, 1
#define OMNI_P_QUOTE_COLON  omni_punct + 1, 2
#define OMNI_P_COLON        omni_punct + 2, 1


static void
omni_emit(omni_json_sink_t *s, const uint8_t *ptr, size_t len)
{
    if (len == 0) {
        return;
    }

    s->total += len;

    if (s->out) {
        if (s->total <= s->out_cap) {
            memcpy(s->out + s->total - len, ptr, len);
        }
        return;
    }

    if (s->nseg && s->last_ptr + s->last_len == ptr) {
        /* contiguous with the open segment: grow it */
        s->last_len += len;
        if (s->nseg <= s->cap) {
            s->segs[s->nseg - 1].len = s->last_len;
        }
        return;
    }

    s->last_ptr = ptr;
    s->last_len = len;
    if (s->nseg < s->cap) {
        s->segs[s->nseg].ptr = ptr;
        s->segs[s->nseg].len = len;
    }
    s->nseg++;
}


/* Does a SET key need JSON escaping (or replacement of bad UTF-8)? */
static int
omni_key_needs_escape(const uint8_t *p, size_t len)
{
    const uint8_t  *end = p + len;
    size_t          k, bad;

    for ( ;; ) {
        p = omni_find_special(p, end);
        if (p >= end) {
            return 0;
        }

        if (*p < 0x80) {
            return 1;
        }

        k = omni_utf8_seq(p, end, &bad);
        if (k == 0) {
            return 1;
        }

        p += k;
    }
}


static void
omni_emit_key(omni_json_sink_t *s, const uint8_t *key, size_t key_len)
{
    size_t  n = 0, room;

    if (!omni_key_needs_escape(key, key_len)) {
        omni_emit(s, OMNI_P_QUOTE);
        omni_emit(s, key, key_len);
        omni_emit(s, OMNI_P_QUOTE_COLON);
        return;
    }

    if (s->out) {
        room = s->total < s->out_cap ? s->out_cap - s->total : 0;
        (void) omni_json_string_encode(key, key_len,
                                       room ? s->out + s->total : NULL, room,
                                       &n);
        s->total += n;

    } else {
        room = s->scratch_cap - s->scratch_used;
        (void) omni_json_string_encode(key, key_len,
                                       s->scratch ? s->scratch
                                                    + s->scratch_used
                                                  : NULL,
                                       s->scratch ? room : 0, &n);
        if (s->scratch == NULL || n > room) {
            /* count it, point nowhere useful: the caller gets ERANGE */
            s->short_scratch = 1;
            s->total += n;
            s->last_ptr = NULL;
            s->last_len = 0;
            s->nseg++;

        } else {
            omni_emit(s, s->scratch + s->scratch_used, n);
            s->scratch_used += n;
        }
    }

    omni_emit(s, OMNI_P_COLON);
}


enum {
    OMNI_KEY_KEPT = 1,      /* the last existing member gets val */
    OMNI_KEY_GONE,          /* every member removed */
    OMNI_KEY_APPENDED,      /* removed, and appended last with val */
};


static inline int
omni_edit_same_key(const omni_json_edit_t *a, const omni_json_edit_t *b)
{
    return a->key_len == b->key_len
           && (a->key_len == 0 || memcmp(a->key, b->key, a->key_len) == 0);
}


/* The first edit naming member m's key, or -1. */
static inline long
omni_edit_for(const uint8_t *buf, const omni_json_member_t *m,
    const omni_json_edit_t *edits, size_t n_edits)
{
    size_t  j;

    for (j = 0; j < n_edits; j++) {
        if (omni_member_is(buf, m, (const uint8_t *) edits[j].key,
                           edits[j].key_len))
        {
            return (long) j;
        }
    }

    return -1;
}


/* members whose edit omni_json_splice() remembers (OMNI_JSON_MAX_EDITS
 * fits int8_t) */
#define OMNI_JSON_SPLICE_MEMO  64


static int
omni_json_splice(const uint8_t *buf, size_t len,
    const omni_json_member_t *members, size_t n_members,
    const omni_json_edit_t *edits, size_t n_edits, omni_json_sink_t *s)
{
    /* per edit j; meaningful where first[j] == j (first edit of its key) */
    uint8_t          first[OMNI_JSON_MAX_EDITS];
    uint8_t          state[OMNI_JSON_MAX_EDITS];
    uint8_t          val[OMNI_JSON_MAX_EDITS];
    uint8_t          added_at[OMNI_JSON_MAX_EDITS];
    long             last[OMNI_JSON_MAX_EDITS];
    /* the edit of each of the first members, found once for both passes */
    int8_t           edit_of[OMNI_JSON_SPLICE_MEMO];

    const omni_json_member_t  *m;
    const uint8_t             *p, *end, *open;
    size_t                     i, j, k, prev_end;
    long                       f;
    int                        emitted = 0;

    if (buf == NULL || (members == NULL && n_members != 0)
        || (edits == NULL && n_edits != 0) || n_edits > OMNI_JSON_MAX_EDITS)
    {
        return OMNI_EINVAL;
    }

    for (j = 0; j < n_edits; j++) {
        const omni_json_edit_t  *ed = &edits[j];

        if ((ed->key == NULL && ed->key_len != 0)
            || (ed->op != OMNI_JSON_SET && ed->op != OMNI_JSON_DELETE)
            || (ed->op == OMNI_JSON_SET
                && (ed->value == NULL || ed->value_len == 0)))
        {
            return OMNI_EINVAL;
        }
    }

    end = buf + len;
    p = omni_skip_ws(buf, end);
    if (p >= end || *p != '{') {
        return OMNI_ETYPE;
    }

    open = p + 1;

    /* the members must lie inside the object, in order */
    prev_end = (size_t) (open - buf);
    for (i = 0; i < n_members; i++) {
        m = &members[i];
        if (m->key_off < prev_end || m->key_len < 2
            || (size_t) m->key_off + m->key_len > m->val_off
            || (size_t) m->val_off + m->val_len >= len)
        {
            return OMNI_EINVAL;
        }

        prev_end = (size_t) m->val_off + m->val_len;
    }

    /* group the edits by key */

    for (j = 0; j < n_edits; j++) {
        first[j] = (uint8_t) j;
        for (k = 0; k < j; k++) {
            if (omni_edit_same_key(&edits[k], &edits[j])) {
                first[j] = (uint8_t) k;
                break;
            }
        }

        last[j] = -1;
    }

    /* the last member named by each edited key */

    if (n_edits) {
        for (i = n_members; i-- > 0; ) {
            f = omni_edit_for(buf, &members[i], edits, n_edits);
            if (i < OMNI_JSON_SPLICE_MEMO) {
                edit_of[i] = (int8_t) f;
            }

            if (f >= 0 && last[f] < 0) {
                last[f] = (long) i;
            }
        }
    }

    /* run each key's edits in order: see omni_json_plan() in the header */

    for (j = 0; j < n_edits; j++) {
        int  st = 0;    /* 0: untouched */

        if (first[j] != j) {
            continue;
        }

        if (last[j] < 0) {
            st = OMNI_KEY_GONE;
        }

        for (k = j; k < n_edits; k++) {
            if (first[k] != j) {
                continue;
            }

            if (edits[k].op == OMNI_JSON_DELETE) {
                st = OMNI_KEY_GONE;
                continue;
            }

            if (st == OMNI_KEY_GONE) {
                st = OMNI_KEY_APPENDED;
                added_at[j] = (uint8_t) k;
            } else if (st == 0) {
                st = OMNI_KEY_KEPT;
            }

            val[j] = (uint8_t) k;
        }

        state[j] = (uint8_t) st;
    }

    /* write: prefix, kept members with their separators, appended, tail */

    omni_emit(s, buf, (n_members ? members[0].key_off : (size_t) (open - buf)));

    for (i = 0; i < n_members; i++) {
        const uint8_t  *v;
        size_t          vlen;

        m = &members[i];
        v = buf + m->val_off;
        vlen = m->val_len;

        f = n_edits == 0 ? -1
            : i < OMNI_JSON_SPLICE_MEMO ? edit_of[i]
            : omni_edit_for(buf, m, edits, n_edits);
        if (f >= 0) {
            if (state[f] != OMNI_KEY_KEPT || last[f] != (long) i) {
                continue;
            }

            v = edits[val[f]].value;
            vlen = edits[val[f]].value_len;
        }

        if (emitted) {
            /* the separator that preceded it holds exactly one comma */
            prev_end = (size_t) members[i - 1].val_off + members[i - 1].val_len;
            omni_emit(s, buf + prev_end, m->key_off - prev_end);
        }

        omni_emit(s, buf + m->key_off, m->val_off - m->key_off);
        omni_emit(s, v, vlen);
        emitted = 1;
    }

    for (k = 0; k < n_edits; k++) {
        const omni_json_edit_t  *ed;

        j = first[k];
        if (state[j] != OMNI_KEY_APPENDED || added_at[j] != k) {
            continue;
        }

        if (emitted) {
            omni_emit(s, OMNI_P_COMMA);
        }

        ed = &edits[val[j]];
        omni_emit_key(s, (const uint8_t *) ed->key, ed->key_len);
        omni_emit(s, ed->value, ed->value_len);
        emitted = 1;
    }

    prev_end = n_members ? (size_t) members[n_members - 1].val_off
                           + members[n_members - 1].val_len
                         : (size_t) (open - buf);
    omni_emit(s, buf + prev_end, len - prev_end);

    return OMNI_OK;
}


int
omni_json_plan(const uint8_t *buf, size_t len,
    const omni_json_member_t *members, size_t n_members,
    const omni_json_edit_t *edits, size_t n_edits,
    omni_json_seg_t *segs, size_t cap, size_t *nseg, size_t *out_len,
    uint8_t *scratch, size_t scratch_cap)
{
    omni_json_sink_t  s;
    int               rc;

    if (nseg == NULL || out_len == NULL || (segs == NULL && cap != 0)
        || (scratch == NULL && scratch_cap != 0))
    {
        return OMNI_EINVAL;
    }

    memset(&s, 0, sizeof(omni_json_sink_t));
    s.segs = segs;
    s.cap = cap;
    s.scratch = scratch;
    s.scratch_cap = scratch_cap;

    rc = omni_json_splice(buf, len, members, n_members, edits, n_edits, &s);
    if (rc != OMNI_OK) {
        return rc;
    }

    *nseg = s.nseg;
    *out_len = s.total;

    return (s.nseg > cap || s.short_scratch) ? OMNI_ERANGE : OMNI_OK;
}


int
omni_json_apply(const uint8_t *buf, size_t len,
    const omni_json_member_t *members, size_t n_members,
    const omni_json_edit_t *edits, size_t n_edits,
    uint8_t *out, size_t cap, size_t *out_len)
{
    omni_json_sink_t  s;
    uint8_t           dummy;
    int               rc;

    if (out_len == NULL || (out == NULL && cap != 0)) {
        return OMNI_EINVAL;
    }

    memset(&s, 0, sizeof(omni_json_sink_t));
    s.out = out ? out : &dummy;     /* non-NULL selects the copying sink */
    s.out_cap = out ? cap : 0;

    rc = omni_json_splice(buf, len, members, n_members, edits, n_edits, &s);
    if (rc != OMNI_OK) {
        return rc;
    }

    *out_len = s.total;
    return s.total > cap ? OMNI_ERANGE : OMNI_OK;
}
