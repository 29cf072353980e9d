// One sequence (one sample of one prompt) inside the engine, and its state.
//
// A sequence's life is an explicit state, changed in few places in engine.cpp:
//
//   Waiting --admit--> Prefilling --last prompt logits--> Generating --stop/length--> Done
//                                                    \--> Scoring (continuations) --> Done
//   Prefilling | Generating | Scoring --pause (no KV room)--> Paused --admit--> Prefilling
//   Scoring --sliding window too short to roll back--> Prefilling (the prompt again)
//   any state --error (submit's checks, no room alone, a fatal decode)--> Done
//
// admit: Engine::admit_round; sample: Engine::sample; score: Engine::score and
// next_continuation; pause: Engine::pause; finish (-> Done): Engine::finish.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"
#include "request.hpp"
#include "sampling.hpp"
#include "scoring.hpp"
#include "text.hpp"

namespace pg {

enum class SeqState : uint8_t {
    Waiting,     // queued, never run: no seq id, no KV
    Paused,      // queued again after giving its KV up for room: all its tokens are recomputed
    Prefilling,  // in a slot, feeding its prompt (or the tokens it had before a pause)
    Generating,  // in a slot, feeding the token it sampled last, one per step
    Scoring,     // in a slot, feeding a continuation teacher-forced (a scoring sequence)
    Done,        // finished, KV already removed; its result leaves with this step's output
};

struct Sequence {
    Item                     item;
    SeqState                 state       = SeqState::Waiting;
    std::vector<llama_token> tokens;          // prompt, then generated tokens
    int32_t                  n_prompt    = 0;
    int32_t                  n_past      = 0; // tokens whose KV is in the cache
    int32_t                  n_generated = 0;
    llama_seq_id             seq_id      = -1; // its slot while in one, else -1
    uint64_t                 admitted_at = 0;  // admission order: the youngest is paused first
    std::unique_ptr<Sampler> sampler;
    std::unique_ptr<ContinuationScorer> scorer;  // a scoring sequence: no sampler
    std::vector<TokenLogprob> logprobs;       // one per generated token, when asked for
    TextAssembler            text;
    Finish                   finish      = Finish::Stop;
    llama_token              stop_token  = -1;
    Failure                  failure;         // why, when finish == Error
    bool                     prefix_user = false; // queued and counted in the shared prefix's users
    int32_t                  n_cached    = -1;    // prompt tokens reused at its first admission (-1: not yet)
    size_t                   tokens_streamed = 0;  // generated tokens already in a delta
    size_t                   bytes_streamed  = 0;  // text bytes already in a delta

    int32_t to_feed() const { return static_cast<int32_t>(tokens.size()) - n_past; }
    // Logits are needed after the last token fed, and by a scoring sequence after every
    // token from the prompt's last on.
    bool wants_logits(int32_t pos) const {
        return pos + 1 == static_cast<int32_t>(tokens.size()) || (scorer && pos + 1 >= n_prompt);
    }
    // In a slot and holding KV: its tokens go into the batch.
    bool running() const {
        return state == SeqState::Prefilling || state == SeqState::Generating || state == SeqState::Scoring;
    }
};

}  // namespace pg
