// The functions the emulated translation units register (their TORCH_LIBRARY_IMPL blocks, through the stand-in
// include/torch/library.h), by schema name. bindings.cpp looks them up when an op is called, after static init.
#pragma once

#include <map>
#include <stdexcept>
#include <string>

namespace ghostfast_emu {

struct Registrar {
  std::map<std::string, void (*)()> functions;
  template <typename F>
  void impl(const char* name, F* fn) {
    functions[name] = reinterpret_cast<void (*)()>(fn);
  }
};
Registrar& registrar();

template <typename Sig>
Sig* registered(const std::string& name) {
  auto it = registrar().functions.find(name);
  if (it == registrar().functions.end()) throw std::runtime_error("cuda_emu: no emulated function " + name);
  return reinterpret_cast<Sig*>(it->second);
}

}  // namespace ghostfast_emu
