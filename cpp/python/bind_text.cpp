// Python binding of the C++ text layer (called from bindings.cpp): the native tokenizer, the chat
// template renderer and TextEngine.
//
// The Python package keeps `tokenizers` / `sentencepiece` and jinja2 (README "Use from C++" says
// why); these bindings exist so that tests and benchmarks hold the C++ text path against them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "flexquant/chat_template.h"
#include "flexquant/text_engine.h"
#include "flexquant/tokenizer.h"

namespace py = pybind11;
using flexquant::Tokenizer;

namespace {

// str (encoded as UTF-8) or bytes (taken as is, possibly invalid UTF-8) -> bytes
std::string text_bytes(const py::object& text) {
    if (py::isinstance<py::bytes>(text)) return text.cast<std::string>();
    if (py::isinstance<py::str>(text)) return text.cast<std::string>();
    throw py::type_error("text must be str or bytes, got " + std::string(py::str(py::type::of(text).attr("__name__"))));
}

std::vector<flexquant::ChatMessage> messages_from(const py::list& messages) {
    std::vector<flexquant::ChatMessage> out;
    for (size_t i = 0; i < messages.size(); ++i) {
        const py::dict m = messages[i].cast<py::dict>();
        if (!m.contains("role") || !m.contains("content")) {
            throw flexquant::Error("messages[" + std::to_string(i) + "] needs 'role' and 'content'");
        }
        out.push_back({m["role"].cast<std::string>(), m["content"].cast<std::string>()});
    }
    return out;
}

py::dict result_dict(const flexquant::GenerateResult& r) {
    py::dict d;
    d["text"] = py::str(r.text);
    d["tokens"] = r.tokens;
    d["n_prompt_tokens"] = r.n_prompt_tokens;
    d["stop_reason"] = flexquant::stop_reason_name(r.stop_reason);
    return d;
}

flexquant::GenerateParams gen_params(int64_t max_new_tokens, float temperature, int64_t top_k, float top_p, float min_p,
                                     float repetition_penalty, uint64_t seed, std::vector<std::string> stop,
                                     bool add_special_tokens, bool ignore_eos) {
    flexquant::GenerateParams p;
    p.max_new_tokens = max_new_tokens;
    p.sampling.temperature = temperature;
    p.sampling.top_k = top_k;
    p.sampling.top_p = top_p;
    p.sampling.min_p = min_p;
    p.sampling.repetition_penalty = repetition_penalty;
    p.seed = seed;
    p.stop = std::move(stop);
    p.add_special_tokens = add_special_tokens;
    p.ignore_eos = ignore_eos;
    return p;
}

// on_text(piece) -> bool|None from Python; None (the return) keeps going.
flexquant::TextCallback text_callback(const py::object& on_text) {
    if (on_text.is_none()) return nullptr;
    return [on_text](const std::string& piece) {
        const py::object r = on_text(py::str(piece));
        return r.is_none() || r.cast<bool>();
    };
}

}  // namespace

void bind_text(py::module_& m) {
    py::class_<Tokenizer>(m, "Tokenizer",
                          "The native C++ tokenizer built from a ModelFile (byte-level BPE or SentencePiece BPE); "
                          "agrees token for token with tokenizers / sentencepiece.")
        .def(py::init([](const flexquant::ModelFile& model) { return Tokenizer::from_model(model); }), py::arg("model"))
        .def(
            "encode",
            [](const Tokenizer& t, const py::object& text, bool add_special) {
                const std::string s = text_bytes(text);
                py::gil_scoped_release release;
                return t.encode(s, add_special);
            },
            py::arg("text"), py::arg("add_special_tokens") = true,
            "Token ids of `text` (str, or bytes that may hold invalid UTF-8); BOS first when the model adds one.")
        .def(
            "decode",
            [](const Tokenizer& t, const std::vector<int32_t>& ids, bool skip_special) {
                std::string s;
                {
                    py::gil_scoped_release release;
                    s = t.decode(ids, skip_special);
                }
                return py::str(s);
            },
            py::arg("ids"), py::arg("skip_special_tokens") = true,
            "Text of `ids`; control tokens dropped unless skip_special_tokens=False.")
        .def_property_readonly("bos_id", &Tokenizer::bos_id)
        .def_property_readonly("eos_id", &Tokenizer::eos_id)
        .def_property_readonly("add_bos", &Tokenizer::add_bos)
        .def_property_readonly("n_vocab", &Tokenizer::n_vocab)
        .def_property_readonly("kind", [](const Tokenizer& t) {
            return t.kind() == flexquant::TokenizerKind::TOKENIZER_BPE ? "bpe" : "spm";
        });
    m.def("native_tokenizer_available", &flexquant::native_tokenizer_available,
          "Whether this build has the byte-level BPE native tokenizer (it needs ICU).");

    m.def(
        "render_chat_template",
        [](const std::string& source, const py::list& messages, bool add_generation_prompt, const std::string& bos_token,
           const std::string& eos_token) {
            return py::str(flexquant::ChatTemplate(source).render(messages_from(messages), add_generation_prompt,
                                                                  bos_token, eos_token));
        },
        py::arg("source"), py::arg("messages"), py::arg("add_generation_prompt") = true, py::arg("bos_token") = "",
        py::arg("eos_token") = "", "Render a chat template with the C++ renderer (the one TextEngine.chat uses).");

    py::class_<flexquant::TextEngine>(m, "TextEngine",
                                      "The C++ text-in, text-out engine (flexquant/text_engine.h), for tests against "
                                      "flexquant_rt.Engine.")
        .def(py::init([](const std::string& path, int64_t n_ctx) {
                 flexquant::EngineParams p;
                 p.n_ctx = n_ctx;
                 return flexquant::TextEngine::open(path, p);
             }),
             py::arg("path"), py::arg("n_ctx") = 0)
        .def(
            "generate",
            [](flexquant::TextEngine& e, const std::string& prompt, int64_t max_new_tokens, float temperature,
               int64_t top_k, float top_p, float min_p, float repetition_penalty, uint64_t seed,
               std::vector<std::string> stop, bool add_special_tokens, bool ignore_eos, const py::object& on_text,
               const py::object& before_step) {
                flexquant::GenerateParams p = gen_params(max_new_tokens, temperature, top_k, top_p, min_p,
                                                         repetition_penalty, seed, std::move(stop), add_special_tokens,
                                                         ignore_eos);
                if (!before_step.is_none()) {
                    p.before_step = [before_step](flexquant::Engine&, int64_t n) { before_step(n); };
                }
                return result_dict(e.generate(prompt, p, text_callback(on_text)));
            },
            py::arg("prompt"), py::arg("max_new_tokens") = 128, py::arg("temperature") = 0.0f, py::arg("top_k") = 0,
            py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f,
            py::arg("seed") = 0, py::arg("stop") = std::vector<std::string>{}, py::arg("add_special_tokens") = true,
            py::arg("ignore_eos") = false, py::arg("on_text") = py::none(), py::arg("before_step") = py::none(),
            "dict(text, tokens, n_prompt_tokens, stop_reason); on_text(piece) streams, returning False stops; "
            "before_step(n_generated) runs before every decode step (a controller: signals(), set_layer_bits()).")
        .def("signals", [](flexquant::TextEngine& e) {
                 const flexquant::StepSignals s = e.engine().signals();
                 return py::make_tuple(s.entropy, s.top1_prob);
             }, "(entropy in nats, top-1 probability) of the last step.")
        .def("set_layer_bits", [](flexquant::TextEngine& e, int bits) {
                 std::vector<int32_t> mask(e.engine().config().n_layers, bits);
                 e.engine().set_layer_bits(mask.data(), static_cast<int64_t>(mask.size()));
             }, py::arg("bits"), "Every layer's linears at `bits` (the LM head keeps its setting).")
        .def(
            "chat",
            [](flexquant::TextEngine& e, const py::list& messages, int64_t max_new_tokens, uint64_t seed,
               std::vector<std::string> stop, const py::object& on_text) {
                return result_dict(e.chat(messages_from(messages),
                                          gen_params(max_new_tokens, 0.0f, 0, 1.0f, 0.0f, 1.0f, seed, std::move(stop),
                                                     false, false),
                                          text_callback(on_text)));
            },
            py::arg("messages"), py::arg("max_new_tokens") = 128, py::arg("seed") = 0,
            py::arg("stop") = std::vector<std::string>{}, py::arg("on_text") = py::none(),
            "Greedy chat() on the model's template.")
        .def("apply_chat_template", [](const flexquant::TextEngine& e, const py::list& messages, bool add_generation_prompt) {
                 return py::str(e.apply_chat_template(messages_from(messages), add_generation_prompt));
             },
             py::arg("messages"), py::arg("add_generation_prompt") = true);
}
