// Time steps per chunk, shared by the kernels and the Python side (which reads it from the
// built module to shape the saved chunk states). A thread keeps one chunk in registers.
#pragma once
constexpr int kChunk = 16;
