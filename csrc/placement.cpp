#include "placement.hpp"

namespace pg {

int64_t place_value(const PlaceOption & o, bool unified) {
    int64_t v = -int64_t(o.lost) - o.gap;
    switch (o.from) {
        case KvFrom::Nothing: break;
        case KvFrom::InPlace: v += o.reuse; break;
        case KvFrom::Copy: v += int64_t(o.reuse) - kv_cost::copy(unified); break;
        case KvFrom::Host: v += int64_t(o.reuse) - kv_cost::restore(o.reuse); break;
    }
    return v;
}

void PlaceChoice::consider(const PlaceOption & o) {
    const int64_t v = place_value(o, unified_);
    if (best_.stream < 0 || v > value_) {
        best_  = o;
        value_ = v;
    }
}

}  // namespace pg
