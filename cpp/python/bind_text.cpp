// Python binding of the C++ text layer (called from bindings.cpp): the native tokenizer.
//
// The Python package tokenizes with `tokenizers` / `sentencepiece` (docs: README "use from C++");
// this binding exists so that tests and benchmarks can hold the C++ tokenizer against them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

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
}
