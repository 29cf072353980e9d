// A loaded llama_model: owned (loaded from a path) or borrowed (from a llama_cpp.Llama,
// whose Python object keeps the weights alive). Tokenizer and metadata queries live here.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "llama.h"

namespace pg {

// What llama.cpp's CPU backend was built with, from ggml's backend registry (what
// llama_print_system_info prints).
struct CpuBackendInfo {
    std::vector<std::pair<std::string, std::string>> features;  // ("AVX2", "1"), ... in ggml's order
    std::vector<std::string> extra_buffer_types;                 // "AMX", "CPU_REPACK", ...: weight repacking
    bool amx_kernels = false;                                    // AMX_INT8 = 1: the AMX matmul kernels are built
};

CpuBackendInfo cpu_backend_info();

class ModelHandle {
public:
    // Throws std::runtime_error with llama.cpp's own reason when the file cannot be loaded.
    // use_extra_bufts: llama_model_params.use_extra_bufts (false: llama.cpp's --no-repack).
    static std::shared_ptr<ModelHandle> load(const std::string & path, int n_gpu_layers, bool use_extra_bufts,
                                             bool verbose);
    // `address` is the llama_model* of a live llama_cpp.Llama; the caller keeps it alive.
    static std::shared_ptr<ModelHandle> borrow(std::uintptr_t address);

    ~ModelHandle();
    ModelHandle(const ModelHandle &) = delete;
    ModelHandle & operator=(const ModelHandle &) = delete;

    llama_model *       get() const { return model_; }
    const llama_vocab * vocab() const { return vocab_; }
    bool                owned() const { return owned_; }

    // Tokenizes like llama-cpp-python's create_completion: BOS per the model's own
    // setting, special tokens written in the text are parsed as such.
    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<llama_token> & tokens, bool render_special) const;
    // The bytes one token contributes to the output text (control tokens render empty).
    std::string piece(llama_token token, bool render_special = false) const;

    int32_t n_vocab() const { return llama_vocab_n_tokens(vocab_); }
    int32_t n_ctx_train() const { return llama_model_n_ctx_train(model_); }
    bool    is_eog(llama_token t) const { return llama_vocab_is_eog(vocab_, t); }
    std::string description() const;
    std::map<std::string, std::string> metadata() const;
    // Empty when the GGUF carries no template of that name.
    std::string chat_template(const std::string & name) const;

private:
    ModelHandle(llama_model * model, bool owned);

    llama_model *       model_;
    const llama_vocab * vocab_;
    bool                owned_;
};

}  // namespace pg
