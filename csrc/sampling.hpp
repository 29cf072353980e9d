// One sampler per sequence, built from that sequence's parameters, and the sampling
// step itself (with an optional grammar and log-probabilities).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
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
    std::string grammar;                             // GBNF; empty: unconstrained
    // Non-empty: the grammar is lazy. It constrains nothing until one of these regexes
    // (ECMAScript) matches the generated text, then applies from the match's first
    // capture group (or the whole match) on; llama.cpp replays the matched text into it.
    std::vector<std::string> grammar_triggers;
    std::vector<std::pair<int32_t, float>> logit_bias;
    int32_t  logprobs          = -1;                 // -1: off; k >= 0: chosen + top k
    bool     cache_prompt      = true;  // reuse cached KV for the prompt, and leave this
                                        // sequence's KV in the prompt cache when it ends
    // Non-empty: a scoring sequence, which samples nothing (the fields above are unused):
    // each continuation (token ids) is teacher-forced after the prompt and its tokens'
    // logprobs are the result (see scoring.hpp).
    std::vector<std::vector<int32_t>> continuations;
};

struct SamplerDeleter {
    void operator()(llama_sampler * s) const { llama_sampler_free(s); }
};
using SamplerPtr = std::unique_ptr<llama_sampler, SamplerDeleter>;

// Log-probability of each generated token under the model's raw distribution (the
// log-softmax of the logits, before bias, penalties, grammar, temperature, truncation).
struct TokenLogprob {
    float                                   logprob = 0.0f;
    std::vector<std::pair<int32_t, float>>  top;    // the k most likely tokens, best first
};

class Sampler {
public:
    // The chain is [logit bias] -> [penalties] -> top-k -> top-p -> min-p -> temperature
    // -> dist, or [logit bias] -> [penalties] -> greedy at temperature 0. The penalty
    // window is primed with the tail of the prompt, as llama-cpp-python and llama-server
    // do. Throws std::invalid_argument when the grammar or a trigger pattern does not parse.
    // `backend`: the engine samples in llama.cpp's graph where this chain allows it
    // (see backend_chain).
    Sampler(const llama_vocab * vocab, const SamplingConfig & cfg, int32_t n_ctx,
            const std::vector<llama_token> & prompt, bool backend = false);

    // The chain to attach to this sequence's stream for backend sampling (llama_set_sampler),
    // or null: only chains of greedy / top-k / top-p / min-p / temperature / dist have a
    // backend form; a grammar, logprobs (raw logits), logit bias or penalties keep a
    // sequence on the host path, in the same batch.
    llama_sampler * backend_chain() const { return backend_ ? chain_.get() : nullptr; }
    // The chain to attach now: llama.cpp initializes a chain for the graph once, so one
    // attached before (the sequence moved to another stream) is replaced by a clone of
    // itself first (its state, e.g. the draw's random generator, goes along).
    llama_sampler * chain_to_attach();
    // llama.cpp would not take the chain (a backend without the ops): sample on the host.
    void            drop_backend() { backend_ = false; }
    // A number no other Sampler of this process has: a stream's attached chain is known
    // by it (a new chain may reuse a freed one's address).
    uint64_t        serial() const { return serial_; }
    // The token llama.cpp sampled in the graph for output `idx`, accepted into the chain;
    // LLAMA_TOKEN_NULL when there is none. Not thread-safe (llama.cpp reorders outputs).
    llama_token     take_backend_token(llama_context * ctx, int32_t idx);

    // Samples (and accepts) the next token from output `idx` of the last decode. `buf` is
    // scratch space of up to vocabulary size, one per calling thread. Sequences' samplers
    // are independent: several may sample at once on different threads, once the decode's
    // outputs are in order (any llama_get_logits call on one thread first).
    llama_token sample(llama_context * ctx, int32_t idx, std::vector<llama_token_data> & buf,
                       TokenLogprob * logprob_out);

private:
    SamplerPtr chain_;
    SamplerPtr grammar_;    // separate: checked against one token first, see sample()
    int32_t    n_vocab_;
    int32_t    logprobs_;
    int32_t    top_k_        = 0;      // > 0: the chain starts with top-k, see prefilter_top_k
    bool       plain_greedy_ = false;  // the chain is greedy alone: an argmax of the logits
    bool       lazy_         = false;  // grammar_ waits for a trigger pattern
    bool       backend_      = false;  // chain_ runs in the graph (backend_chain)
    bool       attached_     = false;  // chain_ was attached once (chain_to_attach)
    uint64_t   serial_       = 0;
};

// The first index of the largest logit (llama.cpp's greedy choice), in vectorizable passes.
llama_token argmax(const float * logits, int32_t n);

// Candidates holding at least the k largest logits (more only on ties at the k-th), in
// vocabulary order: a top-k sampler that follows chooses among them exactly as among all.
void prefilter_top_k(const float * logits, int32_t n, int32_t k, std::vector<llama_token_data> & out);

// Empty when `grammar` parses for this vocabulary, else llama.cpp's complaint.
std::string grammar_error(const llama_vocab * vocab, const std::string & grammar);

}  // namespace pg
