// flexquant::Tokenizer: text <-> token ids in C++, from what the model file carries.
//
//   auto model = flexquant::ModelFile::open("model.fq");
//   auto tok = flexquant::Tokenizer::from_model(*model);       // or throw
//   std::vector<int32_t> ids = tok->encode("Hello world");      // + BOS if the model adds one
//   std::string text = tok->decode(ids);                        // special tokens skipped
//
// Two families, the two the converter accepts, each agreeing token for token with the library
// the Python package uses (tests/test_tokenizer_native.py checks it on a corpus):
//   TOKENIZER_BPE   byte-level BPE (GPT-2, SmolLM2, Llama-3) = Hugging Face `tokenizers`. Reads
//                   tokenizer.ggml.tokens/token_type/merges and the pre-tokenizer description the
//                   converter writes (flexquant.tokenizer.pre_regex, ...; docs/format.md). The
//                   pre-tokenizer regexes run on ICU's regex engine, so the Unicode classes
//                   (\p{L}, \p{N}, white space) are ICU's, not hand-written tables.
//   TOKENIZER_SPM   SentencePiece BPE with byte fallback (Llama-2) = `sentencepiece`. Reads the
//                   SentencePiece model proto (flexquant.tokenizer.sp_model). Only the identity
//                   normalizer is supported (Llama-2's); another one is an error at load.
// Special tokens: in BPE models every added token (token_type CONTROL or USER_DEFINED, e.g.
// <|im_start|>) is recognised in the input text, longest match first, so a chat prompt's role
// markers become their single ids. In SentencePiece models the CONTROL and UNKNOWN pieces (<s>,
// </s>, <unk>) are recognised the same way (as transformers does, so a Llama-2 template's "<s>" is
// the BOS id) and the text between them is encoded as sentencepiece encodes a whole input;
// USER_DEFINED pieces are matched inside it, as sentencepiece does.
//
// Input text is UTF-8. Invalid UTF-8 is not an error: it is replaced by U+FFFD the way each
// reference library does it (BPE: one U+FFFD per maximal invalid subsequence, as Python's
// errors="replace"; SentencePiece: one per invalid byte). decode() returns valid UTF-8 (token
// sequences that end mid-character decode to U+FFFD, as the libraries do).
//
// Threads: a Tokenizer is immutable after from_model(); encode/decode may run concurrently.
// Errors: flexquant::Error, naming the model file and the key or value at fault.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "flexquant/error.h"
#include "flexquant/model_file.h"

namespace flexquant {

enum class TokenizerKind { TOKENIZER_BPE, TOKENIZER_SPM };

// GGUF token types (tokenizer.ggml.token_type), as llama.cpp numbers them.
enum class TokenType : int32_t {
    TOKEN_NORMAL = 1, TOKEN_UNKNOWN = 2, TOKEN_CONTROL = 3, TOKEN_USER_DEFINED = 4,
    TOKEN_UNUSED = 5, TOKEN_BYTE = 6,
};

class Tokenizer {
public:
    // Throws flexquant::Error if the file carries no tokenizer this build can run natively (the
    // message says which key is missing or which feature is unsupported), or if the library was
    // built without ICU (FLEXQUANT_HAVE_ICU; CMake says so when it configures).
    static std::unique_ptr<Tokenizer> from_model(const ModelFile& model);
    ~Tokenizer();
    Tokenizer(const Tokenizer&) = delete;
    Tokenizer& operator=(const Tokenizer&) = delete;

    TokenizerKind kind() const;
    int64_t n_vocab() const;  // = the model's vocabulary (padding ids included)
    int32_t bos_id() const;   // -1 if the model has none
    int32_t eos_id() const;   // -1 if the model has none
    // Whether encode(text, add_special=true) puts bos_id first (tokenizer.ggml.add_bos_token).
    bool add_bos() const;

    // Token ids of `text`. add_special: prepend BOS when add_bos() (never twice).
    std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;
    // Text of `ids`. skip_special: drop CONTROL tokens (BOS, EOS, <|im_end|>, ...). Padding ids
    // (token_type UNUSED, beyond the tokenizer's own vocabulary) decode to nothing. Throws on an
    // id outside 0..n_vocab()-1.
    std::string decode(const int32_t* ids, int64_t n, bool skip_special = true) const;
    std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const {
        return decode(ids.data(), static_cast<int64_t>(ids.size()), skip_special);
    }

    // The vocabulary entry of `id` as stored (byte-level or "▁" escaped); throws if out of range.
    const std::string& token(int32_t id) const;
    TokenType token_type(int32_t id) const;
    // The id whose vocabulary entry is exactly `piece`, or -1.
    int32_t piece_to_id(std::string_view piece) const;

    struct Impl;

private:
    explicit Tokenizer(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

// Whether this build runs byte-level BPE natively (it needs ICU at build time; SentencePiece
// models need nothing more and work in every build).
bool native_tokenizer_available();

}  // namespace flexquant
