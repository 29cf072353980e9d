// The host-memory tier under the KV streams, and the cost model admission places prompts by.
//
// A KV stream's prompt cache entry is overwritten when its stream is needed for another
// prompt. With a host tier (EngineConfig::cache_ram > 0) the engine first saves the
// stream's tokens and KV state (llama_state_seq_get_data_ext) here; a later prompt whose
// longest cached prefix lives here is restored into a free stream (set_data_ext) and
// decodes only the rest. This unit knows nothing of llama.cpp: an entry's state is opaque
// bytes, so its bookkeeping (budget, LRU, prefix-awareness, the index) is tested alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <vector>

namespace pg {

using HostToken = int32_t;  // llama_token

// What admission weighs, in tokens of prompt decoding saved or spent.
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

struct HostEntry {
    std::vector<HostToken> tokens;  // the stream held exactly their KV, at positions [0, n)
    std::vector<uint8_t>   state;   // llama_state_seq_get_data_ext of that stream
    int32_t                pos_min = 0;  // its lowest position held (a sliding window drops older ones)
    size_t bytes() const { return state.size() + tokens.size() * sizeof(HostToken); }
};

struct HostMatch {
    int64_t id = -1;  // the entry; -1: none
    int32_t n  = 0;   // leading tokens of the query it holds
};

// Entries of KV state in host memory, within a budget of bytes, least recently used
// evicted first. Prefix-aware: an entry a longer one contains is not kept (the longer one
// restores any prefix of itself). Looked up through an index of hashes of whole token
// blocks, so a lookup costs O(prompt length / block) hash probes, not a scan of entries.
class HostCache {
public:
    enum class Put { Stored, Held, TooLarge };

    explicit HostCache(size_t budget_bytes, int32_t block = 32);

    size_t  budget() const { return budget_; }
    size_t  bytes() const { return bytes_; }
    size_t  size() const { return entries_.size(); }
    int32_t block() const { return block_; }
    int64_t evictions() const { return evictions_; }

    // The entry holding the longest prefix of t[0, min(n, cap)) (at least one block).
    HostMatch longest(const HostToken * t, int32_t n, int32_t cap) const;
    // An entry holds all of t[0, n).
    bool holds(const HostToken * t, int32_t n) const;
    // Stores an entry (its tokens at least one block): Held when an entry already holds all
    // its tokens (that one is touched), TooLarge when it alone exceeds the budget; entries it
    // contains go, and the least recently used ones until it fits.
    Put put(HostEntry e);
    const HostEntry * get(int64_t id) const;
    void touch(int64_t id);
    void erase(int64_t id);
    void clear();

    // An entry as bytes tagged with `fingerprint` (the configuration its state belongs to),
    // and back: false (and `out` untouched) for bytes of another fingerprint, or malformed.
    static std::string pack(const HostEntry & e, const std::string & fingerprint);
    static bool        unpack(const std::string & bytes, const std::string & fingerprint, HostEntry & out);
    // Every entry, least recently used first.
    std::vector<int64_t> ids() const;

private:
    struct Slot {
        HostEntry                    entry;
        std::vector<uint64_t>        keys;  // one per whole block: hash of tokens [0, (k+1) * block)
        std::list<int64_t>::iterator lru;
    };
    std::vector<uint64_t> block_keys(const HostToken * t, int32_t n) const;
    int32_t               common(const HostEntry & e, const HostToken * t, int32_t n) const;
    void                  drop(int64_t id, bool evicted);

    size_t  budget_;
    int32_t block_;
    size_t  bytes_     = 0;
    int64_t next_id_   = 0;
    int64_t evictions_ = 0;
    std::unordered_map<int64_t, Slot>                  entries_;
    std::unordered_map<uint64_t, std::vector<int64_t>> index_;  // block key -> entries with that prefix
    std::list<int64_t>                                 lru_;    // front: least recently used
};

}  // namespace pg
