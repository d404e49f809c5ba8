// Minimal Unicode support for the tokenizer: UTF-8 decode/encode, code point classes
// (the \p{L}, \p{N}, \s, ... classes used by BPE pre-tokenizer regexes) and the GPT-2
// byte <-> unicode mapping used by byte-level BPE vocabularies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace obc {
namespace unicode {

// Replacement character produced for malformed UTF-8.
constexpr uint32_t kReplacement = 0xFFFD;

// ---- UTF-8 -----------------------------------------------------------------

// Length of the UTF-8 sequence announced by a lead byte (1..4); 1 for bytes that are
// not a valid lead byte (continuation bytes, 0xF8..0xFF).
size_t utf8_seq_len(uint8_t lead);

// Decodes one code point starting at s[pos] and advances pos. A malformed or truncated
// sequence yields kReplacement and advances pos by exactly one byte.
uint32_t decode_utf8(const char * s, size_t n, size_t & pos);
inline uint32_t decode_utf8(const std::string & s, size_t & pos) { return decode_utf8(s.data(), s.size(), pos); }

// Decodes a whole string (malformed bytes -> kReplacement, one per byte).
std::vector<uint32_t> utf8_to_cpts(const std::string & s);

// Appends the UTF-8 encoding of cpt (values above 0x10FFFF are encoded as kReplacement).
void append_utf8(std::string & out, uint32_t cpt);
std::string cpt_to_utf8(uint32_t cpt);

// ---- code point classes -----------------------------------------------------

enum CptFlag : uint8_t {
    CPT_LETTER     = 1 << 0,  // \p{L}
    CPT_NUMBER     = 1 << 1,  // \p{N}
    CPT_WHITESPACE = 1 << 2,  // \s  (Unicode White_Space)
    CPT_PUNCT      = 1 << 3,  // \p{P}
    CPT_SYMBOL     = 1 << 4,  // \p{S}
    CPT_MARK       = 1 << 5,  // \p{M}
};

// Bitwise OR of CptFlag values for a code point (0 for e.g. control/unassigned/separators
// that are not whitespace, and for anything above 0x10FFFF).
uint8_t cpt_flags(uint32_t cpt);

inline bool is_letter(uint32_t cpt)     { return cpt_flags(cpt) & CPT_LETTER; }
inline bool is_number(uint32_t cpt)     { return cpt_flags(cpt) & CPT_NUMBER; }
inline bool is_whitespace(uint32_t cpt) { return cpt_flags(cpt) & CPT_WHITESPACE; }
inline bool is_punct(uint32_t cpt)      { return cpt_flags(cpt) & CPT_PUNCT; }
inline bool is_symbol(uint32_t cpt)     { return cpt_flags(cpt) & CPT_SYMBOL; }
inline bool is_mark(uint32_t cpt)       { return cpt_flags(cpt) & CPT_MARK; }

// ASCII-only case folding. This is exact for the tokenizer's case-insensitive
// contraction matching ('S, 'RE, ...): no non-ASCII code point lowercases to one of
// the ASCII letters involved.
inline uint32_t to_lower_ascii(uint32_t cpt) { return (cpt >= 'A' && cpt <= 'Z') ? cpt + 32 : cpt; }
inline bool eq_ignore_case_ascii(uint32_t cpt, char lower) { return to_lower_ascii(cpt) == (uint32_t) (unsigned char) lower; }

// ---- GPT-2 byte-level mapping -------------------------------------------------

// The printable code point a raw byte is represented by in byte-level BPE vocabularies
// (bytes 0x21..0x7E, 0xA1..0xAC, 0xAE..0xFF map to themselves, the rest to U+0100.. in order).
uint32_t byte_to_cpt(uint8_t b);
// The same as UTF-8 (1 or 2 bytes).
const std::string & byte_to_utf8(uint8_t b);
// Inverse of byte_to_cpt; -1 if cpt is not in the mapping's image.
int cpt_to_byte(uint32_t cpt);

}  // namespace unicode
}  // namespace obc
