// Native tokenizer: byte-level BPE (Hugging Face `tokenizers` semantics) and SentencePiece BPE
// (`sentencepiece` semantics). Each algorithm follows its reference library step by step, since
// the goal is token-for-token agreement, not a tokenizer of our own design:
//   BPE: added tokens split out (leftmost-longest) -> pre-tokenizer regexes (isolated splits) ->
//        bytes mapped to the GPT-2 byte alphabet -> merges by rank with a (rank, position) heap,
//        as tokenizers' Word::merge_all.
//   SPM: identity normalizer (dummy prefix, spaces escaped as U+2581) -> characters and
//        user-defined pieces -> merges by the merged piece's score (ties: leftmost), as
//        sentencepiece's bpe_model.cc -> unknown characters as <0xXX> byte pieces.
#include "flexquant/tokenizer.h"

#include <algorithm>
#include <cstring>
#include <queue>
#include <unordered_map>
#include <utility>

#include "utf8.h"

#ifdef FLEXQUANT_HAVE_ICU
#include <unicode/regex.h>
#include <unicode/utext.h>
#endif

namespace flexquant {

namespace {

constexpr const char* SPACE_SYMBOL = "\xE2\x96\x81";  // U+2581, SentencePiece's escaped space

// ---- a minimal protobuf wire-format reader (for the SentencePiece ModelProto) ---------------
// Only what sentencepiece_model.proto needs: varints, fixed32 and length-delimited fields.
struct PbReader {
    const uint8_t* p;
    const uint8_t* end;
    const std::string* where;

    [[noreturn]] void fail() const { throw Error(*where + ": flexquant.tokenizer.sp_model is not a valid SentencePiece model proto"); }
    bool done() const { return p >= end; }
    uint64_t varint() {
        uint64_t v = 0;
        for (int shift = 0; shift < 64; shift += 7) {
            if (p >= end) fail();
            const uint8_t b = *p++;
            v |= uint64_t(b & 0x7F) << shift;
            if (!(b & 0x80)) return v;
        }
        fail();
    }
    void key(uint32_t* field, uint32_t* wire) {
        const uint64_t k = varint();
        *field = static_cast<uint32_t>(k >> 3);
        *wire = static_cast<uint32_t>(k & 7);
    }
    std::string_view bytes() {
        const uint64_t n = varint();
        if (n > uint64_t(end - p)) fail();
        std::string_view s(reinterpret_cast<const char*>(p), n);
        p += n;
        return s;
    }
    uint32_t fixed32() {
        if (end - p < 4) fail();
        uint32_t v;
        std::memcpy(&v, p, 4);
        p += 4;
        return v;
    }
    void skip(uint32_t wire) {
        switch (wire) {
            case 0: varint(); break;
            case 1: if (end - p < 8) fail(); p += 8; break;
            case 2: bytes(); break;
            case 5: fixed32(); break;
            default: fail();
        }
    }
    PbReader sub() {
        const std::string_view s = bytes();
        return PbReader{reinterpret_cast<const uint8_t*>(s.data()), reinterpret_cast<const uint8_t*>(s.data()) + s.size(), where};
    }
};

#ifdef FLEXQUANT_HAVE_ICU
// GPT-2's byte -> printable character map (bytes_to_unicode in openai/gpt-2 encoder.py): bytes
// that are printable Latin-1 stand for themselves, the others for U+0100 + n in byte order.
void byte_alphabet(std::string byte_char[256], std::unordered_map<uint32_t, uint8_t>& char_byte) {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        const uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + n++);
        byte_char[b].clear();
        utf8::append(byte_char[b], cp);
        char_byte[cp] = static_cast<uint8_t>(b);
    }
}
#endif

}  // namespace

// Token strings to find in text: per first byte, longest first, so the first hit at a position
// is the longest (tokenizers' leftmost-longest added-token matching).
struct TokenTable {
    std::vector<std::pair<std::string, int32_t>> by_byte[256];

    void build(const std::vector<std::string>& tokens, const std::vector<TokenType>& types,
               std::initializer_list<TokenType> which) {
        for (size_t id = 0; id < tokens.size(); ++id) {
            if (!tokens[id].empty() && std::find(which.begin(), which.end(), types[id]) != which.end()) {
                by_byte[static_cast<uint8_t>(tokens[id][0])].emplace_back(tokens[id], static_cast<int32_t>(id));
            }
        }
        for (auto& list : by_byte) {
            std::stable_sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
        }
    }
    // Length and id of the longest token at text[i..], or 0.
    size_t match(std::string_view text, size_t i, int32_t* id) const {
        for (const auto& [piece, pid] : by_byte[static_cast<uint8_t>(text[i])]) {
            if (text.compare(i, piece.size(), piece) == 0) {
                *id = pid;
                return piece.size();
            }
        }
        return 0;
    }
    // Calls segment(text between tokens) and token(id) in text order.
    template <class Segment, class Token>
    void split(std::string_view text, Segment segment, Token token) const {
        size_t start = 0;
        for (size_t i = 0; i < text.size();) {
            int32_t id;
            const size_t n = match(text, i, &id);
            if (n == 0) {
                ++i;
                continue;
            }
            if (i > start) segment(text.substr(start, i - start));
            token(id);
            i += n;
            start = i;
        }
        if (start < text.size()) segment(text.substr(start));
    }
};

struct Tokenizer::Impl {
    std::string where;  // model path, for messages
    TokenizerKind kind = TokenizerKind::TOKENIZER_BPE;
    std::vector<std::string> tokens;
    std::vector<TokenType> types;
    std::unordered_map<std::string, int32_t> vocab;  // piece -> id
    int32_t bos = -1, eos = -1;
    bool add_bos = false;
    // Tokens recognised in the text as a whole: BPE: added tokens (control and user-defined) in
    // the raw text; SentencePiece: user-defined pieces in the normalized text (as sentencepiece).
    TokenTable added;
    // SentencePiece: control and unknown pieces (<s>, </s>, <unk>) in the raw text, as
    // transformers and Meta's Llama-2 chat format treat them: a template's "<s>" is the BOS id.
    TokenTable specials;

    // byte-level BPE
    std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left id, right id) -> (rank, merged id)
    std::string byte_char[256];
    std::unordered_map<uint32_t, uint8_t> char_byte;
    int32_t byte_char_id[256];
    bool add_prefix_space = false, ignore_merges = false;
#ifdef FLEXQUANT_HAVE_ICU
    std::vector<std::unique_ptr<icu::RegexPattern>> regexes;
#endif

    // SentencePiece
    std::vector<float> scores;
    std::unordered_map<std::string, int32_t> sp_pieces;  // NORMAL, USER_DEFINED, UNUSED pieces
    bool sp_word_split = false;  // no piece has "▁" after another character (split_by_whitespace)
    size_t sp_max_len = 0;  // the longest of them: longer pairs need no look-up (most of them)
    // (left id, right id) -> the id of the piece that is their concatenation, for every way of
    // cutting a piece into two pieces: the merge look-up on ids instead of on strings.
    std::unordered_map<uint64_t, int32_t> sp_pairs;
    int32_t n_sp_pieces = 0, unk_id = -1;
    int32_t byte_id[256];
    bool add_dummy_prefix = true, remove_extra_ws = true, escape_ws = true, byte_fallback = false;
    std::string unk_surface = " \xE2\x81\x87 ";  // sentencepiece's default " ⁇ "

    void load_bpe(const ModelFile& m);
    void load_spm(const ModelFile& m);
    void spm_segment(std::string_view text, std::vector<int32_t>& out) const;
    void spm_bpe(std::string_view norm, std::vector<int32_t>& out) const;

    void encode_bpe(std::string_view text, std::vector<int32_t>& out) const;
    void bpe_word(std::string_view word, std::vector<int32_t>& out) const;
    void encode_spm(std::string_view text, std::vector<int32_t>& out) const;
    std::string decode_bpe(const int32_t* ids, int64_t n, bool skip_special) const;
    std::string decode_spm(const int32_t* ids, int64_t n, bool skip_special) const;
};

// ---- loading ----------------------------------------------------------------------------------

namespace {

const MetaValue& need(const ModelFile& m, const std::string& key, MetaType type) {
    const MetaValue* v = m.meta(key);
    if (v == nullptr) throw Error(m.path() + ": the native tokenizer needs metadata key '" + key + "', which is missing");
    if (v->type != type) {
        throw Error(m.path() + ": metadata key '" + key + "' is " + meta_type_name(v->type) + ", expected " +
                    meta_type_name(type));
    }
    return *v;
}

bool flag(const ModelFile& m, const std::string& key, bool dflt) {
    const MetaValue* v = m.meta(key);
    if (v == nullptr) return dflt;
    if (v->type != MetaType::META_BOOL) {
        throw Error(m.path() + ": metadata key '" + key + "' is " + meta_type_name(v->type) + ", expected bool");
    }
    return v->b;
}

}  // namespace

void Tokenizer::Impl::load_bpe(const ModelFile& m) {
#ifndef FLEXQUANT_HAVE_ICU
    throw Error(m.path() + ": byte-level BPE needs the native tokenizer's regex engine (ICU), and this build has none "
                "(install libicu-dev and rebuild)");
#else
    if (const MetaValue* why = m.meta("flexquant.tokenizer.native_unsupported")) {
        throw Error(m.path() + ": the native tokenizer cannot run this model's tokenizer: " + why->s);
    }
    const MetaValue& pre = need(m, "flexquant.tokenizer.pre_regex", MetaType::META_ARRAY);
    if (pre.elem_type != MetaType::META_STRING) throw Error(m.path() + ": flexquant.tokenizer.pre_regex must be an array of strings");
    for (const MetaValue& item : pre.items) {
        // tokenizers runs these on Oniguruma, where \s and \S mean Unicode White_Space; ICU's \s
        // is [\t\n\f\r\p{Z}] (no U+000B, no U+0085), so spell the property out.
        std::string pat;
        for (size_t i = 0; i < item.s.size(); ++i) {
            if (item.s[i] == '\\' && i + 1 < item.s.size()) {
                const char c = item.s[++i];
                if (c == 's') pat += "\\p{White_Space}";
                else if (c == 'S') pat += "\\P{White_Space}";
                else { pat += '\\'; pat += c; }
            } else {
                pat += item.s[i];
            }
        }
        UErrorCode status = U_ZERO_ERROR;
        UParseError perr;
        std::unique_ptr<icu::RegexPattern> re(
            icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(pat), 0, perr, status));
        if (U_FAILURE(status)) {
            throw Error(m.path() + ": flexquant.tokenizer.pre_regex '" + item.s + "' does not compile (" +
                        u_errorName(status) + " at offset " + std::to_string(perr.offset) + ")");
        }
        regexes.push_back(std::move(re));
    }
    add_prefix_space = flag(m, "flexquant.tokenizer.add_prefix_space", false);
    ignore_merges = flag(m, "flexquant.tokenizer.ignore_merges", false);
    add_bos = flag(m, "tokenizer.ggml.add_bos_token", false);

    byte_alphabet(byte_char, char_byte);
    for (int b = 0; b < 256; ++b) {
        const auto it = vocab.find(byte_char[b]);
        byte_char_id[b] = it == vocab.end() ? -1 : it->second;
    }
    const MetaValue& mg = need(m, "tokenizer.ggml.merges", MetaType::META_ARRAY);
    merges.reserve(mg.items.size());
    for (size_t r = 0; r < mg.items.size(); ++r) {
        const std::string& s = mg.items[r].s;
        const size_t sp = s.find(' ');
        const auto a = sp == std::string::npos ? vocab.end() : vocab.find(s.substr(0, sp));
        const auto b = sp == std::string::npos ? vocab.end() : vocab.find(s.substr(sp + 1));
        const auto ab = sp == std::string::npos ? vocab.end() : vocab.find(s.substr(0, sp) + s.substr(sp + 1));
        if (a == vocab.end() || b == vocab.end() || ab == vocab.end()) {
            throw Error(m.path() + ": tokenizer.ggml.merges[" + std::to_string(r) + "] = '" + s +
                        "' joins tokens that are not in the vocabulary");
        }
        const uint64_t key = (uint64_t(uint32_t(a->second)) << 32) | uint32_t(b->second);
        merges.emplace(key, std::make_pair(static_cast<int32_t>(r), ab->second));  // first rank wins
    }
    added.build(tokens, types, {TokenType::TOKEN_CONTROL, TokenType::TOKEN_USER_DEFINED});
#endif
}

void Tokenizer::Impl::load_spm(const ModelFile& m) {
    const ByteSpan proto = m.meta_u8_array("flexquant.tokenizer.sp_model");
    PbReader top{proto.data, proto.data + proto.size, &where};
    std::vector<std::string> pieces;
    std::vector<int32_t> ptypes;
    bool bpe = false;
    std::string normalizer = "";
    bool charsmap = false, ws_suffix = false;
    while (!top.done()) {
        uint32_t f, w;
        top.key(&f, &w);
        if (f == 1 && w == 2) {  // SentencePiece { piece = 1; score = 2; type = 3 }
            PbReader r = top.sub();
            std::string piece;
            float score = 0.0f;
            int32_t type = 1;
            while (!r.done()) {
                uint32_t g, x;
                r.key(&g, &x);
                if (g == 1 && x == 2) piece = std::string(r.bytes());
                else if (g == 2 && x == 5) { const uint32_t u = r.fixed32(); std::memcpy(&score, &u, 4); }
                else if (g == 3 && x == 0) type = static_cast<int32_t>(r.varint());
                else r.skip(x);
            }
            pieces.push_back(std::move(piece));
            scores.push_back(score);
            ptypes.push_back(type);
        } else if (f == 2 && w == 2) {  // TrainerSpec
            PbReader r = top.sub();
            while (!r.done()) {
                uint32_t g, x;
                r.key(&g, &x);
                if (g == 3 && x == 0) bpe = r.varint() == 2;             // model_type: BPE = 2
                else if (g == 35 && x == 0) byte_fallback = r.varint() != 0;
                else if (g == 24 && x == 0) ws_suffix = r.varint() != 0;  // treat_whitespace_as_suffix
                else if (g == 44 && x == 2) unk_surface = std::string(r.bytes());
                else r.skip(x);
            }
        } else if (f == 3 && w == 2) {  // NormalizerSpec
            PbReader r = top.sub();
            while (!r.done()) {
                uint32_t g, x;
                r.key(&g, &x);
                if (g == 1 && x == 2) normalizer = std::string(r.bytes());
                else if (g == 2 && x == 2) charsmap = !r.bytes().empty();
                else if (g == 3 && x == 0) add_dummy_prefix = r.varint() != 0;
                else if (g == 4 && x == 0) remove_extra_ws = r.varint() != 0;
                else if (g == 5 && x == 0) escape_ws = r.varint() != 0;
                else r.skip(x);
            }
        } else {
            top.skip(w);
        }
    }
    if (!bpe) throw Error(m.path() + ": the SentencePiece model is not BPE (the native tokenizer runs BPE models only)");
    if (charsmap) {
        throw Error(m.path() + ": the SentencePiece normalizer '" + normalizer +
                    "' is not supported by the native tokenizer (only 'identity', as Llama-2)");
    }
    if (ws_suffix) throw Error(m.path() + ": SentencePiece treat_whitespace_as_suffix is not supported by the native tokenizer");
    if (static_cast<int64_t>(pieces.size()) > m.config().vocab) {
        throw Error(m.path() + ": the SentencePiece model has " + std::to_string(pieces.size()) +
                    " pieces, the model's vocabulary is " + std::to_string(m.config().vocab));
    }
    n_sp_pieces = static_cast<int32_t>(pieces.size());
    std::fill(byte_id, byte_id + 256, -1);
    for (int32_t id = 0; id < n_sp_pieces; ++id) {
        tokens[id] = pieces[id];
        types[id] = static_cast<TokenType>(ptypes[id]);
        const int32_t t = ptypes[id];
        if (t == 1 || t == 4 || t == 5) {
            sp_pieces.emplace(pieces[id], id);
            sp_max_len = std::max(sp_max_len, pieces[id].size());
        }
        if (t == 2 && unk_id < 0) unk_id = id;
        if (t == 6 && pieces[id].size() == 6 && pieces[id].compare(0, 3, "<0x") == 0) {
            byte_id[std::stoi(pieces[id].substr(3, 2), nullptr, 16)] = id;
        }
    }
    sp_word_split = escape_ws;
    for (const auto& [piece, id] : sp_pieces) {
        size_t k = 0;
        while (piece.compare(k, 3, SPACE_SYMBOL) == 0) k += 3;  // the leading run of "▁"
        if (piece.find(SPACE_SYMBOL, k) != std::string::npos) sp_word_split = false;  // "x▁" inside

    }
    for (const auto& [piece, id] : sp_pieces) {
        for (size_t k = 1; k < piece.size(); ++k) {
            if ((static_cast<uint8_t>(piece[k]) & 0xC0) == 0x80) continue;  // not a character boundary
            const auto a = sp_pieces.find(piece.substr(0, k));
            const auto b = a == sp_pieces.end() ? a : sp_pieces.find(piece.substr(k));
            if (b != sp_pieces.end()) sp_pairs[(uint64_t(uint32_t(a->second)) << 32) | uint32_t(b->second)] = id;
        }
    }
    vocab.clear();
    for (int32_t id = 0; id < n_sp_pieces; ++id) vocab.emplace(tokens[id], id);
    add_bos = flag(m, "tokenizer.ggml.add_bos_token", true);  // Llama-2's convention
    added.build(tokens, types, {TokenType::TOKEN_USER_DEFINED});
    specials.build(tokens, types, {TokenType::TOKEN_CONTROL, TokenType::TOKEN_UNKNOWN});
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::from_model(const ModelFile& m) {
    auto impl = std::make_unique<Impl>();
    impl->where = m.path();
    const std::string& family = m.meta_string("tokenizer.ggml.model");
    const int64_t n_vocab = m.config().vocab;
    const MetaValue& toks = need(m, "tokenizer.ggml.tokens", MetaType::META_ARRAY);
    const MetaValue& types = need(m, "tokenizer.ggml.token_type", MetaType::META_ARRAY);
    if (static_cast<int64_t>(toks.count) != n_vocab || static_cast<int64_t>(types.count) != n_vocab) {
        throw Error(m.path() + ": tokenizer.ggml.tokens has " + std::to_string(toks.count) + " entries and token_type " +
                    std::to_string(types.count) + ", the vocabulary is " + std::to_string(n_vocab));
    }
    impl->tokens.resize(n_vocab);
    impl->types.resize(n_vocab);
    for (int64_t i = 0; i < n_vocab; ++i) {
        impl->tokens[i] = toks.items[i].s;
        impl->types[i] = static_cast<TokenType>(types.at(i).i);
        impl->vocab.emplace(impl->tokens[i], static_cast<int32_t>(i));
    }
    impl->bos = static_cast<int32_t>(m.config().bos_token_id);
    impl->eos = static_cast<int32_t>(m.config().eos_token_id);
    if (family == "gpt2") {
        impl->kind = TokenizerKind::TOKENIZER_BPE;
        impl->load_bpe(m);
    } else if (family == "llama") {
        impl->kind = TokenizerKind::TOKENIZER_SPM;
        if (m.meta("flexquant.tokenizer.sp_model") == nullptr) {
            throw Error(m.path() + ": a llama-family tokenizer needs flexquant.tokenizer.sp_model (the SentencePiece "
                        "model, from a tokenizer.model source) for the native tokenizer, and this file has none");
        }
        impl->load_spm(m);
    } else {
        throw Error(m.path() + ": tokenizer.ggml.model = '" + family + "' is not supported (gpt2, llama)");
    }
    return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

// ---- byte-level BPE ---------------------------------------------------------------------------

void Tokenizer::Impl::bpe_word(std::string_view word, std::vector<int32_t>& out) const {
    std::string mapped;
    for (char c : word) mapped += byte_char[static_cast<uint8_t>(c)];
    if (ignore_merges) {
        const auto it = vocab.find(mapped);
        if (it != vocab.end()) {
            out.push_back(it->second);
            return;
        }
    }
    struct Sym { int32_t id, prev, next; bool alive; };
    std::vector<Sym> sym;
    sym.reserve(word.size());
    for (char c : word) {
        const int32_t id = byte_char_id[static_cast<uint8_t>(c)];
        if (id < 0) continue;  // a byte the vocabulary lacks: tokenizers drops it too (no unk token)
        const int32_t k = static_cast<int32_t>(sym.size());
        sym.push_back({id, k - 1, k + 1, true});
    }
    if (sym.empty()) return;
    sym.back().next = -1;
    struct Merge { int32_t rank, pos, new_id; };
    const auto later = [](const Merge& a, const Merge& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
    std::priority_queue<Merge, std::vector<Merge>, decltype(later)> queue(later);
    const auto find = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
        const auto it = merges.find((uint64_t(uint32_t(a)) << 32) | uint32_t(b));
        return it == merges.end() ? nullptr : &it->second;
    };
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
        if (const auto* mg = find(sym[i].id, sym[i + 1].id)) queue.push({mg->first, int32_t(i), mg->second});
    }
    while (!queue.empty()) {
        const Merge top = queue.top();
        queue.pop();
        Sym& left = sym[top.pos];
        if (!left.alive || left.next < 0) continue;
        const Sym right = sym[left.next];
        const auto* mg = find(left.id, right.id);
        if (mg == nullptr || mg->second != top.new_id) continue;  // a stale entry
        sym[left.next].alive = false;
        left.id = top.new_id;
        left.next = right.next;
        if (right.next >= 0) sym[right.next].prev = top.pos;
        if (left.prev >= 0) {
            if (const auto* p = find(sym[left.prev].id, left.id)) queue.push({p->first, left.prev, p->second});
        }
        if (left.next >= 0) {
            if (const auto* n = find(left.id, sym[left.next].id)) queue.push({n->first, top.pos, n->second});
        }
    }
    for (const Sym& s : sym) {
        if (s.alive) out.push_back(s.id);
    }
}

void Tokenizer::Impl::encode_bpe(std::string_view text, std::vector<int32_t>& out) const {
#ifdef FLEXQUANT_HAVE_ICU
    std::vector<std::string_view> pieces, next;
    UErrorCode status = U_ZERO_ERROR;
    std::vector<std::unique_ptr<icu::RegexMatcher>> matchers;
    for (const auto& re : regexes) {
        matchers.emplace_back(re->matcher(status));
        if (U_FAILURE(status)) throw Error(where + ": ICU regex matcher: " + u_errorName(status));
        // The patterns come from the (untrusted) model file: a catastrophically backtracking one
        // must end in an error (U_REGEX_TIME_OUT, ~10 s of matching), not hang the caller.
        matchers.back()->setTimeLimit(10000, status);
        if (U_FAILURE(status)) throw Error(where + ": ICU regex time limit: " + u_errorName(status));
    }
    std::string prefixed;
    const auto pre_tokenize = [&](std::string_view segment) {
        if (add_prefix_space && (segment.empty() || segment[0] != ' ')) {
            prefixed = " ";
            prefixed += segment;
            segment = prefixed;
        }
        pieces.assign(1, segment);
        for (auto& matcher : matchers) {
            next.clear();
            for (std::string_view p : pieces) {
                UText* ut = utext_openUTF8(nullptr, p.data(), static_cast<int64_t>(p.size()), &status);
                matcher->reset(ut);
                size_t last = 0;
                while (matcher->find(status) && U_SUCCESS(status)) {
                    const size_t s = static_cast<size_t>(matcher->start64(status));
                    const size_t e = static_cast<size_t>(matcher->end64(status));
                    if (e == s) continue;
                    if (s > last) next.push_back(p.substr(last, s - last));
                    next.push_back(p.substr(s, e - s));
                    last = e;
                }
                if (last < p.size()) next.push_back(p.substr(last));
                matcher->reset(icu::UnicodeString());
                utext_close(ut);
                if (U_FAILURE(status)) throw Error(where + ": ICU regex: " + u_errorName(status));
            }
            pieces.swap(next);
        }
        for (std::string_view w : pieces) bpe_word(w, out);
    };
    added.split(text, pre_tokenize, [&](int32_t id) { out.push_back(id); });
#else
    (void)text;
    (void)out;
#endif
}

std::string Tokenizer::Impl::decode_bpe(const int32_t* ids, int64_t n, bool skip_special) const {
    std::string bytes;
    for (int64_t k = 0; k < n; ++k) {
        const int32_t id = ids[k];
        const TokenType t = types[id];
        if (t == TokenType::TOKEN_UNUSED || (skip_special && t == TokenType::TOKEN_CONTROL)) continue;
        // tokenizers' ByteLevel decoder: a token made only of byte-alphabet characters stands for
        // those bytes; any other token (an added token such as "<|im_start|>") for its own UTF-8.
        const std::string& s = tokens[id];
        std::string mapped;
        bool all_mapped = true;
        for (size_t i = 0; i < s.size();) {
            const int len = utf8::char_len(s, i);
            const auto it = char_byte.find(utf8::decode(s, i, len));
            if (it == char_byte.end()) {
                all_mapped = false;
                break;
            }
            mapped += static_cast<char>(it->second);
            i += len;
        }
        bytes += all_mapped ? mapped : s;
    }
    return utf8::sanitize(bytes);
}

// ---- SentencePiece BPE ------------------------------------------------------------------------

void Tokenizer::Impl::encode_spm(std::string_view raw, std::vector<int32_t>& out) const {
    // invalid bytes -> U+FFFD, one per byte (sentencepiece's normalizer); each segment between
    // special pieces is a sentencepiece input of its own (its own dummy prefix)
    const std::string text = utf8::sanitize(raw, /*per_byte=*/true);
    specials.split(text, [&](std::string_view seg) { spm_segment(seg, out); }, [&](int32_t id) { out.push_back(id); });
}

void Tokenizer::Impl::spm_segment(std::string_view segment, std::vector<int32_t>& out) const {
    // Normalizer (identity): extra spaces, dummy prefix, spaces escaped.
    std::string text(segment);
    if (remove_extra_ws) {
        std::string t;
        for (size_t i = 0; i < text.size(); ++i) {
            if (text[i] == ' ' && (t.empty() || t.back() == ' ')) continue;
            t += text[i];
        }
        while (!t.empty() && t.back() == ' ') t.pop_back();
        text.swap(t);
    }
    if (text.empty()) return;
    std::string norm;
    if (add_dummy_prefix) norm += escape_ws ? SPACE_SYMBOL : " ";
    for (char c : text) {
        if (c == ' ' && escape_ws) norm += SPACE_SYMBOL;
        else norm += c;
    }
    if (!sp_word_split) return spm_bpe(norm, out);
    // Words (a run of "▁" and what follows up to the next run) merge independently: no piece
    // spans two of them, so each runs on a small agenda. Same result, far less heap work.
    const std::string_view v(norm);
    const auto word_start = [&](size_t i) {
        return v.compare(i, 3, SPACE_SYMBOL) == 0 && (i < 3 || v.compare(i - 3, 3, SPACE_SYMBOL) != 0);
    };
    size_t start = 0;
    for (size_t i = 1; i < v.size(); ++i) {
        if (word_start(i)) {
            spm_bpe(v.substr(start, i - start), out);
            start = i;
        }
    }
    spm_bpe(v.substr(start), out);
}

void Tokenizer::Impl::spm_bpe(std::string_view norm, std::vector<int32_t>& out) const {
    // id: the symbol's piece in sp_pieces, or -1 (a character the vocabulary lacks)
    struct Sym { int32_t prev, next, id; bool freeze; std::string_view piece; };
    std::vector<Sym> sym;
    std::string piece;  // reused: one allocation for all string look-ups
    for (size_t i = 0; i < norm.size();) {
        int32_t id;
        size_t n = added.match(norm, i, &id);
        const bool freeze = n > 0;
        if (!freeze) {
            n = utf8::char_len(norm, i);
            piece.assign(norm, i, n);
            const auto it = sp_pieces.find(piece);
            id = it == sp_pieces.end() ? -1 : it->second;
        }
        const int32_t k = static_cast<int32_t>(sym.size());
        sym.push_back({k - 1, k + 1, id, freeze, std::string_view(norm).substr(i, n)});
        i += n;
    }
    sym.back().next = -1;
    struct Pair { float score; int32_t left, right, merged; size_t size; };
    const auto worse = [](const Pair& a, const Pair& b) { return a.score < b.score || (a.score == b.score && a.left > b.left); };
    std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> agenda(worse);
    std::unordered_map<std::string, std::pair<std::string, std::string>> rev_merge;
    const auto maybe_add = [&](int32_t l, int32_t r) {
        if (l < 0 || r < 0 || sym[l].freeze || sym[r].freeze) return;
        const size_t size = sym[l].piece.size() + sym[r].piece.size();
        if (size > sp_max_len) return;
        int32_t merged;
        if (sym[l].id >= 0 && sym[r].id >= 0) {  // both pieces: their concatenation is in sp_pairs or nowhere
            const auto it = sp_pairs.find((uint64_t(uint32_t(sym[l].id)) << 32) | uint32_t(sym[r].id));
            if (it == sp_pairs.end()) return;
            merged = it->second;
        } else {
            piece.assign(sym[l].piece.data(), size);  // adjacent in `norm`
            const auto it = sp_pieces.find(piece);
            if (it == sp_pieces.end()) return;
            merged = it->second;
        }
        agenda.push({scores[merged], l, r, merged, size});
        if (types[merged] == TokenType::TOKEN_UNUSED) {
            rev_merge[std::string(sym[l].piece.data(), size)] = {std::string(sym[l].piece), std::string(sym[r].piece)};
        }
    };
    for (size_t i = 1; i < sym.size(); ++i) maybe_add(int32_t(i - 1), int32_t(i));
    while (!agenda.empty()) {
        const Pair top = agenda.top();
        agenda.pop();
        Sym& l = sym[top.left];
        Sym& r = sym[top.right];
        if (l.piece.empty() || r.piece.empty() || l.piece.size() + r.piece.size() != top.size) continue;
        l.piece = std::string_view(l.piece.data(), l.piece.size() + r.piece.size());
        l.id = top.merged;
        r.piece = std::string_view();
        l.next = r.next;
        if (r.next >= 0) sym[r.next].prev = top.left;
        maybe_add(l.prev, top.left);
        maybe_add(top.left, l.next);
    }
    // An UNUSED piece may be formed on the way but is never emitted: split it back (sentencepiece's
    // ResegmentFallback).
    std::vector<std::string> stack;
    std::string key;
    for (int32_t i = 0; i >= 0 && i < int32_t(sym.size()); i = sym[i].next) {
        if (sym[i].id >= 0 && types[sym[i].id] != TokenType::TOKEN_UNUSED) {
            out.push_back(sym[i].id);  // the common case: a piece of the vocabulary
            continue;
        }
        key.assign(sym[i].piece.data(), sym[i].piece.size());
        stack.assign(1, key);
        std::vector<std::string> done;
        while (!stack.empty()) {
            std::string w = std::move(stack.back());
            stack.pop_back();
            const auto it = sp_pieces.find(w);
            if (it != sp_pieces.end() && types[it->second] == TokenType::TOKEN_UNUSED) {
                const auto rm = rev_merge.find(w);
                if (rm != rev_merge.end()) {
                    stack.push_back(rm->second.second);
                    stack.push_back(rm->second.first);
                    continue;
                }
            }
            done.push_back(std::move(w));
        }
        for (const std::string& w : done) {
            const auto it = sp_pieces.find(w);
            if (it != sp_pieces.end()) {
                out.push_back(it->second);
            } else if (byte_fallback) {
                for (char c : w) {
                    const int32_t b = byte_id[static_cast<uint8_t>(c)];
                    if (b < 0) throw Error(where + ": the SentencePiece model lacks the byte piece for a byte of '" + w + "'");
                    out.push_back(b);
                }
            } else {
                out.push_back(unk_id);
            }
        }
    }
}

std::string Tokenizer::Impl::decode_spm(const int32_t* ids, int64_t n, bool skip_special) const {
    (void)skip_special;  // control pieces are invisible in sentencepiece either way
    std::string text, bytes;
    const auto flush = [&]() {  // byte pieces: valid UTF-8 as is, each invalid byte -> U+FFFD
        text += utf8::sanitize(bytes, /*per_byte=*/true);
        bytes.clear();
    };
    bool is_bos_ws = true, bos_ws_seen = false;
    for (int64_t k = 0; k < n; ++k) {
        const int32_t id = ids[k];
        if (id >= n_sp_pieces) continue;  // padding beyond the SentencePiece model
        const TokenType t = types[id];
        if (t == TokenType::TOKEN_BYTE) {
            bytes += static_cast<char>(std::stoi(tokens[id].substr(3, 2), nullptr, 16));
            continue;
        }
        flush();
        if (bos_ws_seen || !text.empty()) is_bos_ws = false;
        bos_ws_seen = false;
        if (t == TokenType::TOKEN_CONTROL) continue;
        if (t == TokenType::TOKEN_UNKNOWN) {
            text += unk_surface;
            continue;
        }
        std::string_view piece = tokens[id];
        if (is_bos_ws && (add_dummy_prefix || remove_extra_ws) && piece.compare(0, 3, SPACE_SYMBOL) == 0) {
            piece.remove_prefix(3);
            bos_ws_seen = !remove_extra_ws;
        }
        for (size_t i = 0; i < piece.size();) {
            if (piece.compare(i, 3, SPACE_SYMBOL) == 0) {
                text += ' ';
                i += 3;
            } else {
                text += piece[i++];
            }
        }
    }
    flush();
    return text;
}

// ---- public -----------------------------------------------------------------------------------

TokenizerKind Tokenizer::kind() const { return impl_->kind; }
int64_t Tokenizer::n_vocab() const { return static_cast<int64_t>(impl_->tokens.size()); }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::add_bos() const { return impl_->add_bos && impl_->bos >= 0; }

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
    std::vector<int32_t> out;
    if (impl_->kind == TokenizerKind::TOKENIZER_BPE) {
        impl_->encode_bpe(utf8::sanitize(text), out);
    } else {
        impl_->encode_spm(text, out);
    }
    if (add_special && add_bos() && (out.empty() || out[0] != impl_->bos)) out.insert(out.begin(), impl_->bos);
    return out;
}

std::string Tokenizer::decode(const int32_t* ids, int64_t n, bool skip_special) const {
    for (int64_t k = 0; k < n; ++k) {
        if (ids[k] < 0 || ids[k] >= n_vocab()) {
            throw Error("decode: token id ids[" + std::to_string(k) + "] = " + std::to_string(ids[k]) + " is outside 0.." +
                        std::to_string(n_vocab() - 1));
        }
    }
    return impl_->kind == TokenizerKind::TOKENIZER_BPE ? impl_->decode_bpe(ids, n, skip_special)
                                                       : impl_->decode_spm(ids, n, skip_special);
}

const std::string& Tokenizer::token(int32_t id) const {
    if (id < 0 || id >= n_vocab()) {
        throw Error("token: id " + std::to_string(id) + " is outside 0.." + std::to_string(n_vocab() - 1));
    }
    return impl_->tokens[id];
}

TokenType Tokenizer::token_type(int32_t id) const {
    token(id);  // range check
    return impl_->types[id];
}

int32_t Tokenizer::piece_to_id(std::string_view piece) const {
    const auto it = impl_->vocab.find(std::string(piece));
    return it == impl_->vocab.end() ? -1 : it->second;
}

bool native_tokenizer_available() {
#ifdef FLEXQUANT_HAVE_ICU
    return true;
#else
    return false;
#endif
}

}  // namespace flexquant
