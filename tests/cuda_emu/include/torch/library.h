// Stand-in for torch/library.h in the emulated translation units: TORCH_LIBRARY_IMPL(ns, key, m) { m.impl(name, fn); }
// records each function in the emulator's registry (registry.h) instead of the dispatcher, where bindings.cpp
// finds it by name and exposes it as torch.ops.ghostfast_emu.<name>.
#pragma once
#include "../../registry.h"

#define GHOSTFAST_EMU_CAT2(a, b) a##b
#define GHOSTFAST_EMU_CAT(a, b) GHOSTFAST_EMU_CAT2(a, b)
#define TORCH_LIBRARY_IMPL(ns, key, m)                                                                     \
  static void GHOSTFAST_EMU_CAT(ghostfast_emu_impl_, __LINE__)(::ghostfast_emu::Registrar & m);             \
  static const bool GHOSTFAST_EMU_CAT(ghostfast_emu_registered_, __LINE__) =                                \
      (GHOSTFAST_EMU_CAT(ghostfast_emu_impl_, __LINE__)(::ghostfast_emu::registrar()), true);               \
  static void GHOSTFAST_EMU_CAT(ghostfast_emu_impl_, __LINE__)(::ghostfast_emu::Registrar & m)
