// Scoring: a sequence that samples nothing. After its prompt it feeds fixed continuations
// (token ids), teacher-forced, and reads the log-softmax of each continuation token from
// the logits at the position before it.
//
// The continuations of one prompt are fed one after another in the same sequence: the
// prompt's KV is decoded once, each continuation is decoded after it and then removed
// again (the KV is rolled back to the prompt's end). The logits of the prompt's last token
// score the first token of every continuation at once, so a one-token continuation costs
// no decoding beyond the prompt; a continuation of m tokens costs m - 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llama.h"
#include "request.hpp"

namespace pg {

class ContinuationScorer {
public:
    explicit ContinuationScorer(std::vector<std::vector<llama_token>> continuations);

    // Why `continuations` cannot run after a prompt of n_prompt tokens in a sequence of
    // n_ctx tokens; no code when they can.
    static Failure check(const std::vector<std::vector<llama_token>> & continuations, int32_t n_vocab,
                         int32_t n_prompt, int32_t n_ctx);

    // The logits after the prompt's last token: the first token of every continuation.
    void read_first(const float * logits, int32_t n_vocab);
    // The logits after token k of the current continuation: its token k + 1.
    void read_next(const float * logits, int32_t n_vocab, int32_t k);
    // Moves to the next continuation that has tokens to feed (all but its last); false
    // when none is left (one-token continuations are scored by read_first alone).
    bool advance();
    // The current continuation's KV was dropped: it is fed again, after the prompt.
    void rewind() { current_ = current_ >= 0 ? current_ - 1 : -1; }
    // The current continuation's tokens to feed after the prompt: all but its last.
    std::vector<llama_token> to_feed() const;
    // The longest continuation, in tokens.
    int32_t max_len() const;

    // Every continuation's tokens and their logprobs, laid end to end in order.
    const std::vector<llama_token> & tokens() const { return tokens_; }
    const std::vector<float> &       logprobs() const { return logprobs_; }

private:
    std::vector<llama_token> tokens_;
    std::vector<size_t>      start_;  // continuation j is tokens_[start_[j], start_[j + 1])
    std::vector<float>       logprobs_;
    int32_t                  current_ = -1;  // the continuation being fed; -1 before the first
};

// log(sum(exp(logits))) over the vocabulary: each term in float, their sum in double.
float log_sum_exp(const float * logits, int32_t n_vocab);

}  // namespace pg
