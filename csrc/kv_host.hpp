// The host-memory tier under the KV streams (the cost of a restore: placement.hpp).
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
