#include "unicode.h"

#include <algorithm>
#include <array>
#include <iterator>

namespace obc {
namespace unicode {

namespace {

struct CptRange {
    uint32_t first, last;
};

#include "unicode_tables.inc"

template <size_t N>
bool in_ranges(const CptRange (&ranges)[N], uint32_t cpt) {
    const CptRange * end = ranges + N;
    // first range whose last >= cpt
    const CptRange * it = std::lower_bound(ranges, end, cpt,
                                           [](const CptRange & r, uint32_t c) { return r.last < c; });
    return it != end && it->first <= cpt;
}

uint8_t compute_flags(uint32_t cpt) {
    uint8_t f = 0;
    if (in_ranges(k_letter_ranges, cpt))     f |= CPT_LETTER;
    if (in_ranges(k_number_ranges, cpt))     f |= CPT_NUMBER;
    if (in_ranges(k_whitespace_ranges, cpt)) f |= CPT_WHITESPACE;
    if (in_ranges(k_punct_ranges, cpt))      f |= CPT_PUNCT;
    if (in_ranges(k_symbol_ranges, cpt))     f |= CPT_SYMBOL;
    if (in_ranges(k_mark_ranges, cpt))       f |= CPT_MARK;
    return f;
}

// Flags for the whole Basic Multilingual Plane, filled once from the range tables.
struct BmpTable {
    std::array<uint8_t, 0x10000> flags{};
    BmpTable() {
        auto fill = [this](const CptRange * b, const CptRange * e, uint8_t bit) {
            for (; b != e && b->first < 0x10000; ++b) {
                const uint32_t last = std::min<uint32_t>(b->last, 0xFFFF);
                for (uint32_t c = b->first; c <= last; ++c) flags[c] |= bit;
            }
        };
        fill(std::begin(k_letter_ranges), std::end(k_letter_ranges), CPT_LETTER);
        fill(std::begin(k_number_ranges), std::end(k_number_ranges), CPT_NUMBER);
        fill(std::begin(k_whitespace_ranges), std::end(k_whitespace_ranges), CPT_WHITESPACE);
        fill(std::begin(k_punct_ranges), std::end(k_punct_ranges), CPT_PUNCT);
        fill(std::begin(k_symbol_ranges), std::end(k_symbol_ranges), CPT_SYMBOL);
        fill(std::begin(k_mark_ranges), std::end(k_mark_ranges), CPT_MARK);
    }
};

const BmpTable & bmp_table() {
    static const BmpTable table;  // thread-safe one-time init
    return table;
}

struct ByteMap {
    uint32_t to_cpt[256];
    std::string to_utf8[256];
    int16_t from_cpt[324];  // image of the mapping lies in [0, 0x143]
    ByteMap() {
        std::fill(std::begin(from_cpt), std::end(from_cpt), int16_t(-1));
        uint32_t next = 256;
        for (int b = 0; b < 256; ++b) {
            const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
            const uint32_t c = printable ? (uint32_t) b : next++;
            to_cpt[b] = c;
            to_utf8[b] = cpt_to_utf8(c);
            from_cpt[c] = (int16_t) b;
        }
    }
};

const ByteMap & byte_map() {
    static const ByteMap map;
    return map;
}

}  // namespace

size_t utf8_seq_len(uint8_t lead) {
    if (lead < 0x80) return 1;
    if ((lead & 0xE0) == 0xC0) return 2;
    if ((lead & 0xF0) == 0xE0) return 3;
    if ((lead & 0xF8) == 0xF0) return 4;
    return 1;
}

uint32_t decode_utf8(const char * s, size_t n, size_t & pos) {
    const uint8_t b0 = (uint8_t) s[pos];
    if (b0 < 0x80) {
        pos += 1;
        return b0;
    }
    const size_t len = utf8_seq_len(b0);
    if (len == 1 || pos + len > n) {
        pos += 1;
        return kReplacement;
    }
    uint32_t cpt = (len == 2) ? (b0 & 0x1F) : (len == 3) ? (b0 & 0x0F) : (b0 & 0x07);
    for (size_t i = 1; i < len; ++i) {
        const uint8_t b = (uint8_t) s[pos + i];
        if ((b & 0xC0) != 0x80) {
            pos += 1;
            return kReplacement;
        }
        cpt = (cpt << 6) | (b & 0x3F);
    }
    if (cpt > 0x10FFFF) {
        pos += 1;
        return kReplacement;
    }
    pos += len;
    return cpt;
}

std::vector<uint32_t> utf8_to_cpts(const std::string & s) {
    std::vector<uint32_t> out;
    out.reserve(s.size());
    size_t pos = 0;
    while (pos < s.size()) out.push_back(decode_utf8(s.data(), s.size(), pos));
    return out;
}

void append_utf8(std::string & out, uint32_t cpt) {
    if (cpt > 0x10FFFF) cpt = kReplacement;
    if (cpt < 0x80) {
        out.push_back((char) cpt);
    } else if (cpt < 0x800) {
        out.push_back((char) (0xC0 | (cpt >> 6)));
        out.push_back((char) (0x80 | (cpt & 0x3F)));
    } else if (cpt < 0x10000) {
        out.push_back((char) (0xE0 | (cpt >> 12)));
        out.push_back((char) (0x80 | ((cpt >> 6) & 0x3F)));
        out.push_back((char) (0x80 | (cpt & 0x3F)));
    } else {
        out.push_back((char) (0xF0 | (cpt >> 18)));
        out.push_back((char) (0x80 | ((cpt >> 12) & 0x3F)));
        out.push_back((char) (0x80 | ((cpt >> 6) & 0x3F)));
        out.push_back((char) (0x80 | (cpt & 0x3F)));
    }
}

std::string cpt_to_utf8(uint32_t cpt) {
    std::string s;
    append_utf8(s, cpt);
    return s;
}

uint8_t cpt_flags(uint32_t cpt) {
    if (cpt < 0x10000) return bmp_table().flags[cpt];
    if (cpt > 0x10FFFF) return 0;
    return compute_flags(cpt);
}

uint32_t byte_to_cpt(uint8_t b) { return byte_map().to_cpt[b]; }

const std::string & byte_to_utf8(uint8_t b) { return byte_map().to_utf8[b]; }

int cpt_to_byte(uint32_t cpt) {
    if (cpt >= 324) return -1;
    return byte_map().from_cpt[cpt];
}

}  // namespace unicode
}  // namespace obc
