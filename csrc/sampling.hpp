// One llama_sampler chain per sequence, built from that sequence's parameters.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"

namespace pg {

// Already validated by the Python SamplingParams; the engine trusts these values.
struct SamplingConfig {
    int32_t  max_tokens        = 128;
    float    temperature       = 0.8f;  // 0: greedy
    int32_t  top_k             = 40;    // 0: off
    float    top_p             = 0.95f; // 1: off
    float    min_p             = 0.05f; // 0: off
    float    repeat_penalty    = 1.0f;  // 1: off
    int32_t  repeat_last_n     = 64;    // -1: whole context
    float    frequency_penalty = 0.0f;
    float    presence_penalty  = 0.0f;
    uint32_t seed              = 0;
    std::vector<std::string> stop;
    std::vector<int32_t>     stop_token_ids;
    bool     ignore_eos        = false;
};

struct SamplerDeleter {
    void operator()(llama_sampler * s) const { llama_sampler_free(s); }
};
using SamplerPtr = std::unique_ptr<llama_sampler, SamplerDeleter>;

// Builds the chain [penalties] -> top-k -> top-p -> min-p -> temperature -> dist,
// or [penalties] -> greedy at temperature 0. The penalty window is primed with the
// tail of the prompt, as llama-cpp-python and llama-server do.
SamplerPtr make_sampler(const llama_vocab * vocab, const SamplingConfig & cfg, int32_t n_ctx,
                        const std::vector<llama_token> & prompt);

}  // namespace pg
