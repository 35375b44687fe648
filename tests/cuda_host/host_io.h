// File input and output of the host emulators in tests/cuda_host (raw arrays numpy wrote / reads).
#pragma once

#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

template <class T>
std::vector<T> read_file(const std::string& path, size_t count) {
    std::vector<T> v(count);
    std::ifstream f(path, std::ios::binary);
    if (!f.read(reinterpret_cast<char*>(v.data()), std::streamsize(count * sizeof(T))))
        throw std::runtime_error("cannot read " + path);
    return v;
}
template <class T>
void write_file(const std::string& path, const std::vector<T>& v) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
}
