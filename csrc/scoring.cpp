#include "scoring.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace pg {

ContinuationScorer::ContinuationScorer(std::vector<std::vector<llama_token>> continuations) {
    start_.push_back(0);
    for (const auto & c : continuations) {
        tokens_.insert(tokens_.end(), c.begin(), c.end());
        start_.push_back(tokens_.size());
    }
    logprobs_.assign(tokens_.size(), 0.0f);
}

Failure ContinuationScorer::check(const std::vector<std::vector<llama_token>> & continuations, int32_t n_vocab,
                                  int32_t n_prompt, int32_t n_ctx) {
    for (size_t j = 0; j < continuations.size(); ++j) {
        const auto & c = continuations[j];
        if (c.empty()) {
            return {ErrorCode::InvalidParam, "continuation " + std::to_string(j) + " has no tokens"};
        }
        for (llama_token t : c) {
            if (t < 0 || t >= n_vocab) {
                return {ErrorCode::InvalidParam, "continuation " + std::to_string(j) + " has token id " +
                                                     std::to_string(t) + ", outside the vocabulary of " +
                                                     std::to_string(n_vocab)};
            }
        }
        if (int64_t(n_prompt) + int64_t(c.size()) > n_ctx) {
            return {ErrorCode::PromptTooLong,
                    "the prompt (" + std::to_string(n_prompt) + " tokens) plus continuation " + std::to_string(j) +
                        " (" + std::to_string(c.size()) + " tokens) is longer than a sequence's n_ctx=" +
                        std::to_string(n_ctx) + "; shorten it or open the model with a larger n_ctx"};
        }
    }
    return {};
}

void ContinuationScorer::read_first(const float * logits, int32_t n_vocab) {
    const float lse = log_sum_exp(logits, n_vocab);
    for (size_t j = 0; j + 1 < start_.size(); ++j) {
        logprobs_[start_[j]] = logits[tokens_[start_[j]]] - lse;
    }
}

void ContinuationScorer::read_next(const float * logits, int32_t n_vocab, int32_t k) {
    const size_t at = start_[static_cast<size_t>(current_)] + static_cast<size_t>(k) + 1;
    logprobs_[at]   = logits[tokens_[at]] - log_sum_exp(logits, n_vocab);
}

bool ContinuationScorer::advance() {
    const int32_t n = static_cast<int32_t>(start_.size()) - 1;
    do {
        ++current_;
    } while (current_ < n && start_[current_ + 1] - start_[current_] < 2);
    return current_ < n;
}

std::vector<llama_token> ContinuationScorer::to_feed() const {
    const auto b = tokens_.begin();
    return {b + static_cast<std::ptrdiff_t>(start_[current_]), b + static_cast<std::ptrdiff_t>(start_[current_ + 1] - 1)};
}

int32_t ContinuationScorer::max_len() const {
    size_t n = 0;
    for (size_t j = 0; j + 1 < start_.size(); ++j) {
        n = std::max(n, start_[j + 1] - start_[j]);
    }
    return static_cast<int32_t>(n);
}

float log_sum_exp(const float * logits, int32_t n_vocab) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int32_t t = 0; t < n_vocab; ++t) {
        mx = std::max(mx, logits[t]);
    }
    double sum = 0.0;
    for (int32_t t = 0; t < n_vocab; ++t) {
        sum += std::exp(logits[t] - mx);
    }
    return mx + static_cast<float>(std::log(sum));
}

}  // namespace pg
