#include "model.hpp"

#include <mutex>
#include <stdexcept>

#include "ggml-backend.h"

#include "logging.hpp"

namespace pg {
namespace {

std::once_flag g_backend_once;

void ensure_backend() {
    // llama_cpp already did this on import; doing it again is harmless, skipping it is not.
    std::call_once(g_backend_once, [] { llama_backend_init(); });
}

}  // namespace

CpuBackendInfo cpu_backend_info() {
    ensure_backend();
    CpuBackendInfo info;
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) {
        return info;
    }
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto get_features = reinterpret_cast<ggml_backend_get_features_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    for (ggml_backend_feature * f = get_features ? get_features(reg) : nullptr; f && f->name; ++f) {
        const std::string name = f->name, value = f->value ? f->value : "";
        info.amx_kernels = info.amx_kernels || (name == "AMX_INT8" && value == "1");
        info.features.emplace_back(name, value);
    }
    // The buffer types llama.cpp adds to the CPU's when use_extra_bufts is on (make_cpu_buft_list).
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts"));
    for (ggml_backend_buffer_type_t * b = get_extra ? get_extra(dev) : nullptr; b && *b; ++b) {
        info.extra_buffer_types.emplace_back(ggml_backend_buft_name(*b));
    }
    return info;
}

ModelHandle::ModelHandle(llama_model * model, bool owned)
    : model_(model), vocab_(llama_model_get_vocab(model)), owned_(owned) {}

ModelHandle::~ModelHandle() {
    LogScope scope(false);
    if (owned_ && model_) {
        llama_model_free(model_);
    }
}

std::shared_ptr<ModelHandle> ModelHandle::load(const std::string & path, int n_gpu_layers, bool use_extra_bufts,
                                               bool verbose) {
    install_log_router();
    ensure_backend();
    LogScope scope(verbose);
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers    = n_gpu_layers;
    mp.use_extra_bufts = use_extra_bufts;
    llama_model * m = llama_model_load_from_file(path.c_str(), mp);
    if (!m) {
        std::string why = take_log_errors();
        throw std::runtime_error("llama.cpp could not load '" + path + "'" + (why.empty() ? "" : ": " + why));
    }
    return std::shared_ptr<ModelHandle>(new ModelHandle(m, true));
}

std::shared_ptr<ModelHandle> ModelHandle::borrow(std::uintptr_t address) {
    install_log_router();
    if (address == 0) {
        throw std::invalid_argument("the llama_cpp.Llama has no model (was it closed?)");
    }
    return std::shared_ptr<ModelHandle>(new ModelHandle(reinterpret_cast<llama_model *>(address), false));
}

std::vector<llama_token> ModelHandle::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    if (text.size() > static_cast<size_t>(INT32_MAX)) {
        throw std::length_error("prompt is larger than 2 GiB");
    }
    const int32_t len = static_cast<int32_t>(text.size());
    std::vector<llama_token> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab_, text.data(), len, out.data(), static_cast<int32_t>(out.size()), add_special,
                               parse_special);
    if (n == INT32_MIN) {
        throw std::length_error("prompt has more tokens than int32 can count");
    }
    if (n < 0) {  // buffer too small: -n is the size needed
        out.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab_, text.data(), len, out.data(), static_cast<int32_t>(out.size()), add_special,
                           parse_special);
        if (n < 0) {
            throw std::runtime_error("llama_tokenize failed");
        }
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string ModelHandle::piece(llama_token token, bool render_special) const {
    char buf[128];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, render_special);
    if (n >= 0) {
        return std::string(buf, static_cast<size_t>(n));
    }
    std::string big(static_cast<size_t>(-n), '\0');
    n = llama_token_to_piece(vocab_, token, big.data(), static_cast<int32_t>(big.size()), 0, render_special);
    if (n < 0) {
        throw std::runtime_error("llama_token_to_piece failed for token " + std::to_string(token));
    }
    big.resize(static_cast<size_t>(n));
    return big;
}

std::string ModelHandle::detokenize(const std::vector<llama_token> & tokens, bool render_special) const {
    std::string out;
    for (llama_token t : tokens) {
        out += piece(t, render_special);
    }
    return out;
}

std::string ModelHandle::description() const {
    char buf[256];
    int32_t n = llama_model_desc(model_, buf, sizeof(buf));
    return n > 0 ? std::string(buf, std::min<size_t>(static_cast<size_t>(n), sizeof(buf) - 1)) : std::string();
}

std::map<std::string, std::string> ModelHandle::metadata() const {
    std::map<std::string, std::string> out;
    const int32_t count = llama_model_meta_count(model_);
    std::vector<char> key(512), val(4096);
    for (int32_t i = 0; i < count; ++i) {
        int32_t nk = llama_model_meta_key_by_index(model_, i, key.data(), key.size());
        if (nk < 0) {
            continue;
        }
        if (static_cast<size_t>(nk) >= key.size()) {
            key.resize(static_cast<size_t>(nk) + 1);
            llama_model_meta_key_by_index(model_, i, key.data(), key.size());
        }
        int32_t nv = llama_model_meta_val_str_by_index(model_, i, val.data(), val.size());
        if (nv < 0) {
            continue;
        }
        if (static_cast<size_t>(nv) >= val.size()) {
            val.resize(static_cast<size_t>(nv) + 1);
            nv = llama_model_meta_val_str_by_index(model_, i, val.data(), val.size());
        }
        out.emplace(std::string(key.data()), std::string(val.data(), static_cast<size_t>(nv)));
    }
    return out;
}

std::string ModelHandle::chat_template(const std::string & name) const {
    const char * t = llama_model_chat_template(model_, name.empty() ? nullptr : name.c_str());
    return t ? std::string(t) : std::string();
}

}  // namespace pg
