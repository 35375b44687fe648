// Argument checks shared by the binding files: numpy arrays must already have the stated dtype,
// be C-contiguous and have the stated shape (nothing is cast or copied silently); each failure
// raises TypeError/ValueError naming the argument and the expected shape.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace flexquant_py {

namespace py = pybind11;

// "(2, 7)", "(5,)".
inline std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks dtype T, C-contiguity and ndim (ndim < 0: any); returns the array unchanged.
template <typename T>
py::array_t<T> require(const py::array& a, const char* name, int ndim, const char* expect) {
    if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>()))
        throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                             ", got " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
    if (ndim >= 0 && a.ndim() != ndim)
        throw py::value_error(std::string(name) + ": expected shape " + expect + ", got " + shape_str(a));
    return py::reinterpret_borrow<py::array_t<T>>(a);
}

// Checks one axis of an array whose ndim is already known.
inline void expect_dim(const py::array& a, int axis, int64_t want, const char* name, const std::string& expect) {
    if (a.shape(axis) != want)
        throw py::value_error(std::string(name) + ": expected shape " + expect + ", got " + shape_str(a));
}

}  // namespace flexquant_py
