// What crosses the engine's boundary: an Item in (one sequence: one sample of one prompt,
// already tokenized, part of one caller's request), a Result out, and why a sequence
// failed as a code. "Request" always means a caller's call (many items), as in Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llama.h"
#include "sampling.hpp"

namespace pg {

// Why a sequence finished with Finish::Error. Callers map codes, never messages: the
// message is for people and may change.
enum class ErrorCode : int {
    None = 0,
    EmptyPrompt,    // the prompt has no tokens
    PromptTooLong,  // prompt (or prompt + a scored continuation) does not fit n_ctx
    InvalidPrompt,  // a token id outside the vocabulary
    InvalidParam,   // parameters this model cannot honour (a grammar it rejects, a bad continuation)
    NoKvRoom,       // the sequence does not fit the KV pool even alone
    Aborted,        // dropped by a fatal llama_decode failure
};

struct Failure {
    ErrorCode   code = ErrorCode::None;
    std::string message;

    explicit operator bool() const { return code != ErrorCode::None; }
};

struct Item {
    uint64_t                 request = 0;  // the caller's request (one call) it belongs to: routing, cancelling
    int64_t                  index   = 0;  // the prompt's index within its request
    int32_t                  sample  = 0;  // which of the prompt's samples
    bool                     stream  = false; // report new tokens every step (StepOutput::deltas)
    int32_t                  stream_interval = 1; // with stream: a delta once this many tokens are new (the
                                                  // first token at once; what is left comes in the Result)
    std::vector<llama_token> tokens;       // the prompt, tokenized by the caller
    SamplingConfig           params;
};

enum class Finish : int { Stop = 0, Length = 1, Error = 2 };

struct Result {
    uint64_t                 request     = 0;
    int64_t                  index       = 0;
    int32_t                  sample      = 0;
    int32_t                  n_prompt    = 0;
    std::vector<llama_token> tokens;        // generated tokens, a final stop token included
    std::string              text;          // complete UTF-8 characters; stop string removed
    Finish                   finish      = Finish::Stop;
    std::string              stop_string;   // the stop string that ended it, if any
    llama_token              stop_token  = -1; // the EOG / stop token that ended it, if any
    ErrorCode                error_code  = ErrorCode::None;  // why, when finish == Error
    std::string              error;         // the same for people
    int32_t                  n_cached    = 0; // prompt tokens whose KV was reused, not decoded
                                            // (the prompt cache or a shared prefix)
    std::vector<TokenLogprob> logprobs;     // per generated token, if params.logprobs >= 0
    // A scoring sequence (params.continuations) puts every continuation's tokens, end to
    // end, in `tokens` and their logprobs in `logprobs` (no top alternatives).
};

}  // namespace pg
