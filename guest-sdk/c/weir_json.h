/* weir_json.h: reading JSON without copying, for handlers in C.
 *
 * Values are `weir_bytes` spans of the original text. weir_json_valid checks
 * a whole document (RFC 8259, nesting at most 128 deep). Objects and arrays
 * are walked member by member; numbers are read as exact integers only (a
 * fraction, an exponent or a value out of range is not an integer); strings
 * are compared after unescaping. Writing JSON is snprintf's job. */
#ifndef WEIR_JSON_H
#define WEIR_JSON_H

#include "weir.h"

#define WEIR_JSON_MAX_DEPTH 128

typedef struct weir_json {
  const uint8_t *p;
  const uint8_t *end;
} weir_json;

static inline void weir__json_ws(weir_json *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static inline bool weir__json_lit(weir_json *j, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0) return false;
  j->p += n;
  return true;
}

static inline bool weir__json_hex(uint8_t c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Skips one UTF-8 sequence whose lead byte `c` was just read; false if it
 * is not well-formed (overlong, surrogate, beyond U+10FFFF, cut short). */
static inline bool weir__json_utf8(weir_json *j, uint8_t c) {
  int more;
  uint32_t min, cp;
  if (c >= 0xC2 && c <= 0xDF) more = 1, min = 0x80, cp = c & 0x1F;
  else if (c >= 0xE0 && c <= 0xEF) more = 2, min = 0x800, cp = c & 0x0F;
  else if (c >= 0xF0 && c <= 0xF4) more = 3, min = 0x10000, cp = c & 0x07;
  else return false;
  for (int i = 0; i < more; i++) {
    if (j->p >= j->end || (*j->p & 0xC0) != 0x80) return false;
    cp = (cp << 6) | (*j->p++ & 0x3F);
  }
  return cp >= min && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
}

static inline bool weir__json_string(weir_json *j) {
  if (j->p >= j->end || *j->p != '"') return false;
  j->p++;
  while (j->p < j->end) {
    uint8_t c = *j->p++;
    if (c == '"') return true;
    if (c < 0x20) return false;
    if (c >= 0x80 && !weir__json_utf8(j, c)) return false;
    if (c == '\\') {
      if (j->p >= j->end) return false;
      uint8_t e = *j->p++;
      if (e == 'u') {
        for (int i = 0; i < 4; i++) {
          if (j->p >= j->end || !weir__json_hex(*j->p)) return false;
          j->p++;
        }
      } else if (!strchr("\"\\/bfnrt", e) || e == 0) {
        return false;
      }
    }
  }
  return false;
}

static inline bool weir__json_digits(weir_json *j) {
  const uint8_t *start = j->p;
  while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
  return j->p > start;
}

static inline bool weir__json_number(weir_json *j) {
  if (j->p < j->end && *j->p == '-') j->p++;
  if (j->p < j->end && *j->p == '0') {
    j->p++;
  } else if (!weir__json_digits(j)) {
    return false;
  }
  if (j->p < j->end && *j->p == '.') {
    j->p++;
    if (!weir__json_digits(j)) return false;
  }
  if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
    j->p++;
    if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
    if (!weir__json_digits(j)) return false;
  }
  return true;
}

/* Skips one value at the cursor (after white space); false if it is not one. */
static inline bool weir__json_value(weir_json *j, int depth) {
  weir__json_ws(j);
  if (j->p >= j->end || depth > WEIR_JSON_MAX_DEPTH) return false;
  switch (*j->p) {
    case '"':
      return weir__json_string(j);
    case 't':
      return weir__json_lit(j, "true");
    case 'f':
      return weir__json_lit(j, "false");
    case 'n':
      return weir__json_lit(j, "null");
    case '[':
    case '{': {
      bool object = *j->p == '{';
      uint8_t close = object ? '}' : ']';
      j->p++;
      weir__json_ws(j);
      if (j->p < j->end && *j->p == close) {
        j->p++;
        return true;
      }
      for (;;) {
        if (object) {
          weir__json_ws(j);
          if (!weir__json_string(j)) return false;
          weir__json_ws(j);
          if (j->p >= j->end || *j->p++ != ':') return false;
        }
        if (!weir__json_value(j, depth + 1)) return false;
        weir__json_ws(j);
        if (j->p >= j->end) return false;
        uint8_t c = *j->p++;
        if (c == close) return true;
        if (c != ',') return false;
      }
    }
    default:
      return weir__json_number(j);
  }
}

/* Is `text` one JSON value (with white space around it)? */
static inline bool weir_json_valid(weir_bytes text) {
  weir_json j = {text.ptr, text.ptr + text.len};
  if (!weir__json_value(&j, 0)) return false;
  weir__json_ws(&j);
  return j.p == j.end;
}

/* Starts walking the object or array `value` (a valid JSON span). */
static inline bool weir_json_enter(weir_bytes value, uint8_t open, weir_json *walk) {
  weir_json j = {value.ptr, value.ptr + value.len};
  weir__json_ws(&j);
  if (j.p >= j.end || *j.p != open) return false;
  j.p++;
  *walk = j;
  return true;
}

/* The next member of an object being walked: its key (quoted, as written)
 * and value spans; false at the end. */
static inline bool weir_json_next_member(weir_json *walk, weir_bytes *key, weir_bytes *value) {
  weir__json_ws(walk);
  if (walk->p < walk->end && *walk->p == ',') walk->p++;
  weir__json_ws(walk);
  if (walk->p >= walk->end || *walk->p == '}') return false;
  const uint8_t *k = walk->p;
  if (!weir__json_string(walk)) return false;
  key->ptr = k;
  key->len = (size_t)(walk->p - k);
  weir__json_ws(walk);
  if (walk->p >= walk->end || *walk->p++ != ':') return false;
  weir__json_ws(walk);
  const uint8_t *v = walk->p;
  if (!weir__json_value(walk, 1)) return false;
  value->ptr = v;
  value->len = (size_t)(walk->p - v);
  return true;
}

/* The next element of an array being walked; false at the end. */
static inline bool weir_json_next_element(weir_json *walk, weir_bytes *value) {
  weir__json_ws(walk);
  if (walk->p < walk->end && *walk->p == ',') walk->p++;
  weir__json_ws(walk);
  if (walk->p >= walk->end || *walk->p == ']') return false;
  const uint8_t *v = walk->p;
  if (!weir__json_value(walk, 1)) return false;
  value->ptr = v;
  value->len = (size_t)(walk->p - v);
  return true;
}

static inline uint8_t weir_json_kind(weir_bytes value) {
  return value.len ? value.ptr[0] : 0;
}

static inline int weir__json_hex_value(uint8_t c) {
  return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* Does the JSON string `quoted` (as written, quotes included, valid) equal
 * the UTF-8 `text` once unescaped (every escape, surrogate pairs too)? */
static inline bool weir_json_string_is(weir_bytes quoted, const char *text) {
  if (quoted.len < 2 || quoted.ptr[0] != '"') return false;
  const uint8_t *want = (const uint8_t *)text, *want_end = want + strlen(text);
  size_t i = 1;
  while (i + 1 < quoted.len) {
    uint8_t c = quoted.ptr[i++];
    if (c != '\\') {
      if (want >= want_end || *want++ != c) return false;
      continue;
    }
    uint8_t e = quoted.ptr[i++];
    uint32_t cp;
    switch (e) {
      case 'b': cp = '\b'; break;
      case 'f': cp = '\f'; break;
      case 'n': cp = '\n'; break;
      case 'r': cp = '\r'; break;
      case 't': cp = '\t'; break;
      case 'u': {
        cp = 0;
        for (int k = 0; k < 4; k++) cp = cp * 16 + (uint32_t)weir__json_hex_value(quoted.ptr[i++]);
        if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= quoted.len - 1 && quoted.ptr[i] == '\\' &&
            quoted.ptr[i + 1] == 'u') {
          uint32_t low = 0;
          for (int k = 0; k < 4; k++) low = low * 16 + (uint32_t)weir__json_hex_value(quoted.ptr[i + 2 + k]);
          if (low >= 0xDC00 && low <= 0xDFFF) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            i += 6;
          }
        }
        if (cp >= 0xD800 && cp <= 0xDFFF) return false; /* a lone surrogate equals no UTF-8 text */
        break;
      }
      default: cp = e; break; /* \" \\ \/ */
    }
    uint8_t utf8[4];
    size_t n;
    if (cp < 0x80) utf8[0] = (uint8_t)cp, n = 1;
    else if (cp < 0x800) utf8[0] = (uint8_t)(0xC0 | cp >> 6), utf8[1] = (uint8_t)(0x80 | (cp & 0x3F)), n = 2;
    else if (cp < 0x10000)
      utf8[0] = (uint8_t)(0xE0 | cp >> 12), utf8[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F)),
      utf8[2] = (uint8_t)(0x80 | (cp & 0x3F)), n = 3;
    else
      utf8[0] = (uint8_t)(0xF0 | cp >> 18), utf8[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F)),
      utf8[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F)), utf8[3] = (uint8_t)(0x80 | (cp & 0x3F)), n = 4;
    if ((size_t)(want_end - want) < n || memcmp(want, utf8, n) != 0) return false;
    want += n;
  }
  return want == want_end;
}

/* The last member called `name` of the JSON object `object` (as serde and
 * JSON pointers read duplicate keys); false if there is none. */
static inline bool weir_json_member(weir_bytes object, const char *name, weir_bytes *value) {
  weir_json walk;
  weir_bytes key, v;
  bool found = false;
  if (!weir_json_enter(object, '{', &walk)) return false;
  while (weir_json_next_member(&walk, &key, &v)) {
    if (weir_json_string_is(key, name)) {
      *value = v;
      found = true;
    }
  }
  return found;
}

/* `value` without the JSON white space around it. */
static inline weir_bytes weir_json_trim(weir_bytes value) {
  weir_json j = {value.ptr, value.ptr + value.len};
  weir__json_ws(&j);
  const uint8_t *end = j.end;
  while (end > j.p && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r')) end--;
  weir_bytes out = {j.p, (size_t)(end - j.p)};
  return out;
}

/* `value` as an exact unsigned integer no larger than `max`. */
static inline bool weir_json_uint(weir_bytes value, uint64_t max, uint64_t *out) {
  value = weir_json_trim(value);
  if (value.len == 0 || value.len > 20) return false;
  if (value.len > 1 && value.ptr[0] == '0') return false;
  uint64_t n = 0;
  for (size_t i = 0; i < value.len; i++) {
    uint8_t c = value.ptr[i];
    if (c < '0' || c > '9') return false;
    if (n > (UINT64_MAX - (uint64_t)(c - '0')) / 10) return false;
    n = n * 10 + (uint64_t)(c - '0');
  }
  if (n > max) return false;
  *out = n;
  return true;
}

/* `value` as an exact signed 64-bit integer. */
static inline bool weir_json_int(weir_bytes value, int64_t *out) {
  value = weir_json_trim(value);
  bool negative = value.len && value.ptr[0] == '-';
  weir_bytes digits = {value.ptr + negative, value.len - negative};
  uint64_t magnitude;
  if (!weir_json_uint(digits, negative ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX, &magnitude)) {
    return false;
  }
  if (negative && magnitude == 0) return false; /* -0 is not an integer in serde's eyes */
  *out = negative ? (int64_t)(0 - magnitude) : (int64_t)magnitude;
  return true;
}

/* `text` as a quoted JSON string (malloc'd, NUL-terminated): `"`, `\\` and
 * control characters escaped, other bytes as they are (UTF-8 passes through). */
static inline char *weir_json_quote(weir_bytes text) {
  char *out = (char *)malloc(text.len * 6 + 3);
  if (out == NULL) abort();
  size_t n = 0;
  out[n++] = '"';
  for (size_t i = 0; i < text.len; i++) {
    uint8_t c = text.ptr[i];
    if (c == '"' || c == '\\') {
      out[n++] = '\\';
      out[n++] = (char)c;
    } else if (c < 0x20) {
      n += (size_t)snprintf(out + n, 7, "\\u%04x", c);
    } else {
      out[n++] = (char)c;
    }
  }
  out[n++] = '"';
  out[n] = '\0';
  return out;
}

#endif /* WEIR_JSON_H */
