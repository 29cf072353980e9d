// The cost model admission places a prompt by: where its leading tokens' KV comes from
// (decoded, reused in place, copied from another stream, restored from the host tier) and
// what taking a stream costs, all in tokens of prompt decoding. Plain inputs and outputs, no
// llama.cpp: the engine gathers the options (streams.hpp finds them), this unit weighs them.
#pragma once

#include <cstdint>

namespace pg {

namespace kv_cost {
// A KV copy between two streams moves a whole stream (llama.cpp copies streams, not cells),
// and one that leaves a hole in the live seq ids costs another (close_gaps). Measured on
// SmolLM2 (2 cores): a stream copy takes 4-14 ms for 512-4096 cells, about what decoding a
// few prompt tokens takes; prefixes shorter than this are decoded rather than copied.
constexpr int32_t kCopyTokens = 16;
// Restoring n tokens from host memory: a fixed part (a stream cleared, a state parsed and
// its cells found) and a part per token (a copy of its K and V rows: 23 KB for SmolLM2).
// Measured on SmolLM2-135M (2 cores, benchmarks/prompt_cache.py --only crossover): a restore
// takes ~0.3 ms + ~2.7 us per token (5.7 ms for 2,048 tokens), saving ~15-25 us per token,
// against 3-5 ms per prompt token decoded: restoring is cheaper than decoding from one token
// on. Charged conservatively: a few tokens fixed, and 1/64 of a decoded token per token.
constexpr int32_t kRestoreTokens   = 4;
constexpr int32_t kRestorePerToken = 64;  // one token of decoding per this many restored
inline int64_t copy(bool unified) { return unified ? 1 : kCopyTokens; }  // unified: cells gain a seq id
inline int64_t restore(int32_t n) { return kRestoreTokens + n / kRestorePerToken; }
}  // namespace kv_cost

// Where a prompt's reused KV comes from.
enum class KvFrom : uint8_t { Nothing, InPlace, Copy, Host };

// One way to start a prompt: in free stream `stream`, its first `reuse` tokens' KV from
// `from`, dropping `lost` cached tokens no other stream holds, and `gap` tokens' worth of
// moves to keep the live seq ids consecutive.
struct PlaceOption {
    int32_t stream = -1;
    KvFrom  from   = KvFrom::Nothing;
    int32_t source = -1;  // the stream copied from (Copy), == stream (InPlace), else -1
    int32_t reuse  = 0;
    int32_t lost   = 0;
    int64_t gap    = 0;
    int64_t host   = -1;  // the host tier's entry (Host)
};

// Tokens of decoding an option saves, net of what it costs.
int64_t place_value(const PlaceOption & o, bool unified);

// The option worth most; on equal worth the first considered.
class PlaceChoice {
public:
    explicit PlaceChoice(bool unified) : unified_(unified) {}
    void                consider(const PlaceOption & o);
    bool                any() const { return best_.stream >= 0; }
    const PlaceOption & best() const { return best_; }
    int64_t             value() const { return value_; }

private:
    bool        unified_;
    PlaceOption best_;
    int64_t     value_ = 0;
};

}  // namespace pg
