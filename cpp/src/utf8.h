// UTF-8 helpers shared by the tokenizer and the text engine (internal).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace flexquant {
namespace utf8 {

constexpr const char* REPLACEMENT = "\xEF\xBF\xBD";  // U+FFFD

// Length of the valid UTF-8 sequence at s[i..], or 0 if it is invalid; *bad_len gets the length
// of the maximal invalid subpart (Unicode 15 §3.9 "U+FFFD substitution of maximal subparts", the
// rule Python's errors="replace" and Rust's from_utf8_lossy follow): >= 1.
inline int valid_len(std::string_view s, size_t i, int* bad_len) {
    const auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
    const uint8_t c = b(i);
    if (c < 0x80) return 1;
    int need;
    uint8_t lo = 0x80, hi = 0xBF;  // range of the second byte
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c == 0xE0) { need = 2; lo = 0xA0; }
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
    else if (c == 0xED) { need = 2; hi = 0x9F; }
    else if (c == 0xF0) { need = 3; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) need = 3;
    else if (c == 0xF4) { need = 3; hi = 0x8F; }
    else { *bad_len = 1; return 0; }
    for (int k = 1; k <= need; ++k) {
        const uint8_t lo_k = k == 1 ? lo : 0x80, hi_k = k == 1 ? hi : 0xBF;
        if (i + k >= s.size() || b(i + k) < lo_k || b(i + k) > hi_k) {
            *bad_len = k;
            return 0;
        }
    }
    return need + 1;
}

// `s` with every maximal invalid subpart replaced by U+FFFD (per_byte: one U+FFFD per invalid
// byte instead, as sentencepiece does).
inline std::string sanitize(std::string_view s, bool per_byte = false) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        int bad = 0;
        const int n = valid_len(s, i, &bad);
        if (n > 0) {
            out.append(s.data() + i, n);
            i += n;
        } else {
            out += REPLACEMENT;
            i += per_byte ? 1 : bad;
        }
    }
    return out;
}

// Length of the UTF-8 character starting at s[i] (s is valid UTF-8).
inline int char_len(std::string_view s, size_t i) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

inline void append(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

// Code point of the valid UTF-8 character at s[i] of length n.
inline uint32_t decode(std::string_view s, size_t i, int n) {
    const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(s[i + k])); };
    switch (n) {
        case 1: return b(0);
        case 2: return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
        case 3: return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
        default: return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
    }
}

}  // namespace utf8
}  // namespace flexquant
