// The torch headers every kernel file includes, compiled once per build into a precompiled header (__init__.py's
// build: `-include torch_prelude.h`, the .gch beside the objects): parsing them was ~10 of each file's ~12 s to compile.
// Where the precompiled header cannot be used, the compiler reads this file instead: the same code either way.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>
