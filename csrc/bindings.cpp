// pybind11 surface of the engine. Conversions only: every call that reaches llama.cpp
// releases the GIL, and every C++ exception becomes a Python one.
#include <dlfcn.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ggml-backend.h"
#include "engine.hpp"
#include "kv_host.hpp"
#include "logging.hpp"
#include "model.hpp"
#include "placement.hpp"
#include "sampling.hpp"
#include "streams.hpp"
#include "text.hpp"

namespace py = pybind11;
using namespace pg;

namespace {

// The file that provides llama_decode in this process: proves which libllama we use.
std::string libllama_path() {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void *>(&llama_decode), &info) && info.dli_fname) {
        return info.dli_fname;
    }
    return "";
}

std::vector<std::string> backend_names() {
    std::vector<std::string> out;
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        out.emplace_back(ggml_backend_reg_name(ggml_backend_reg_get(i)));
    }
    return out;
}

// llama.cpp's CPU backend here is built with OpenMP, whose thread teams belong to the
// thread that started them and stay docked until it exits. A docked team on the caller's
// thread (say from a llama_cpp.Llama used there) makes libgomp count more threads than
// cores and throttle the spin-waits of the engine thread's team: every barrier of every
// decode then sleeps and wakes (measured: ~35% slower). Releasing the caller's idle team
// (OpenMP 5's omp_pause_resource_all) avoids it; libgomp starts a new one when needed.
bool release_caller_openmp_threads() {
    void * gomp = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!gomp) {
        return false;  // not an OpenMP build: nothing docked anywhere
    }
    using pause_fn = int (*)(int);
    auto pause     = reinterpret_cast<pause_fn>(dlsym(gomp, "omp_pause_resource_all"));
    const bool ok  = pause && pause(/*omp_pause_soft=*/1) == 0;
    dlclose(gomp);
    return ok;
}

// [(logprob, [(token, logprob), ...]), ...], one per generated token
py::list logprob_list(const std::vector<TokenLogprob> & logprobs) {
    py::list out;
    for (const auto & lp : logprobs) {
        out.append(py::make_tuple(lp.logprob, py::cast(lp.top)));
    }
    return out;
}

// The engine's stream table with sequences made from token lists: its placement questions
// (longest prefix, losses, victims, LRU) are tested on exact layouts, without a model.
struct TestStreams {
    explicit TestStreams(int32_t n) : table(n) {}
    StreamTable              table;
    std::vector<StreamToken> prefix;  // the prefix's tokens live with their owner, as in the engine

    Sequence & seq(int32_t id) {
        Sequence * s = table.seq(id);
        if (!s) {
            throw py::value_error("stream " + std::to_string(id) + " holds no sequence");
        }
        return *s;
    }
};

KvFrom kv_from(const std::string & name) {
    if (name == "nothing") return KvFrom::Nothing;
    if (name == "in_place") return KvFrom::InPlace;
    if (name == "copy") return KvFrom::Copy;
    if (name == "host") return KvFrom::Host;
    throw py::value_error("kv source: nothing, in_place, copy or host, not '" + name + "'");
}

PlaceOption place_option(const py::dict & d) {
    PlaceOption o;
    o.stream = d.contains("stream") ? d["stream"].cast<int32_t>() : 0;
    o.from   = kv_from(d.contains("kv_from") ? d["kv_from"].cast<std::string>() : "nothing");
    o.source = d.contains("source") ? d["source"].cast<int32_t>() : -1;
    o.reuse  = d.contains("reuse") ? d["reuse"].cast<int32_t>() : 0;
    o.lost   = d.contains("lost") ? d["lost"].cast<int32_t>() : 0;
    o.gap    = d.contains("gap") ? d["gap"].cast<int64_t>() : 0;
    o.host   = d.contains("host") ? d["host"].cast<int64_t>() : -1;
    return o;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "parallel_gen native engine (llama.cpp batch loop)";
    install_log_router();

    m.def("libllama_path", &libllama_path);
    m.def("release_caller_openmp_threads", &release_caller_openmp_threads);
    m.def("backends", &backend_names);
    m.def("system_info", [] { return std::string(llama_print_system_info()); });
    m.def("max_parallel_sequences", [] { return llama_max_parallel_sequences(); });
    m.def("kv_streams", &kv_streams, py::arg("config"));
    m.def("supports_gpu_offload", [] { return llama_supports_gpu_offload(); });
    m.def("engines_alive", &Engine::alive);

    py::class_<CpuBackendInfo>(m, "CpuBackendInfo")
        .def_readonly("features", &CpuBackendInfo::features)
        .def_readonly("extra_buffer_types", &CpuBackendInfo::extra_buffer_types)
        .def_readonly("amx_kernels", &CpuBackendInfo::amx_kernels);
    m.def("cpu_backend_info", &cpu_backend_info);

    py::class_<ModelHandle, std::shared_ptr<ModelHandle>>(m, "ModelHandle")
        .def_static("load", &ModelHandle::load, py::arg("path"), py::arg("n_gpu_layers"), py::arg("use_extra_bufts"),
                    py::arg("verbose"),
                    py::call_guard<py::gil_scoped_release>())
        .def_static("borrow", &ModelHandle::borrow, py::arg("address"))
        .def_property_readonly("owned", &ModelHandle::owned)
        .def_property_readonly("n_vocab", &ModelHandle::n_vocab)
        .def_property_readonly("n_ctx_train", &ModelHandle::n_ctx_train)
        .def_property_readonly("description", &ModelHandle::description)
        .def_property_readonly("n_params", [](const ModelHandle & h) { return llama_model_n_params(h.get()); })
        .def_property_readonly("size_bytes", [](const ModelHandle & h) { return llama_model_size(h.get()); })
        .def_property_readonly("n_layer", [](const ModelHandle & h) { return llama_model_n_layer(h.get()); })
        .def_property_readonly("n_swa", [](const ModelHandle & h) { return llama_model_n_swa(h.get()); })
        .def("metadata", &ModelHandle::metadata)
        .def("chat_template", &ModelHandle::chat_template, py::arg("name") = "")
        .def("is_eog", &ModelHandle::is_eog)
        .def("grammar_error",
             [](const ModelHandle & h, const std::string & grammar) { return grammar_error(h.vocab(), grammar); },
             py::arg("grammar"), py::call_guard<py::gil_scoped_release>())
        .def("tokenize",
             [](const ModelHandle & h, const std::string & text, bool add_special, bool parse_special) {
                 return h.tokenize(text, add_special, parse_special);
             },
             py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = true,
             py::call_guard<py::gil_scoped_release>())
        .def("detokenize",
             [](const ModelHandle & h, const std::vector<llama_token> & tokens, bool render_special) {
                 for (llama_token t : tokens) {
                     if (t < 0 || t >= h.n_vocab()) {
                         throw py::value_error("token id " + std::to_string(t) + " is outside the vocabulary");
                     }
                 }
                 return py::bytes(h.detokenize(tokens, render_special));
             },
             py::arg("tokens"), py::arg("render_special") = false);

    py::class_<SamplingConfig>(m, "SamplingConfig")
        .def(py::init<>())
        .def_readwrite("max_tokens", &SamplingConfig::max_tokens)
        .def_readwrite("temperature", &SamplingConfig::temperature)
        .def_readwrite("top_k", &SamplingConfig::top_k)
        .def_readwrite("top_p", &SamplingConfig::top_p)
        .def_readwrite("min_p", &SamplingConfig::min_p)
        .def_readwrite("repeat_penalty", &SamplingConfig::repeat_penalty)
        .def_readwrite("repeat_last_n", &SamplingConfig::repeat_last_n)
        .def_readwrite("frequency_penalty", &SamplingConfig::frequency_penalty)
        .def_readwrite("presence_penalty", &SamplingConfig::presence_penalty)
        .def_readwrite("seed", &SamplingConfig::seed)
        .def_readwrite("stop", &SamplingConfig::stop)
        .def_readwrite("stop_token_ids", &SamplingConfig::stop_token_ids)
        .def_readwrite("ignore_eos", &SamplingConfig::ignore_eos)
        .def_readwrite("grammar", &SamplingConfig::grammar)
        .def_readwrite("grammar_triggers", &SamplingConfig::grammar_triggers)
        .def_readwrite("logit_bias", &SamplingConfig::logit_bias)
        .def_readwrite("logprobs", &SamplingConfig::logprobs)
        .def_readwrite("cache_prompt", &SamplingConfig::cache_prompt)
        .def_readwrite("continuations", &SamplingConfig::continuations);

    py::class_<EngineConfig>(m, "EngineConfig")
        .def(py::init<>())
        .def_readwrite("n_parallel", &EngineConfig::n_parallel)
        .def_readwrite("n_ctx", &EngineConfig::n_ctx)
        .def_readwrite("n_batch", &EngineConfig::n_batch)
        .def_readwrite("n_threads", &EngineConfig::n_threads)
        .def_readwrite("kv_unified", &EngineConfig::kv_unified)
        .def_readwrite("flash_attn", &EngineConfig::flash_attn)
        .def_readwrite("type_k", &EngineConfig::type_k)
        .def_readwrite("type_v", &EngineConfig::type_v)
        .def_readwrite("kv_size", &EngineConfig::kv_size)
        .def_readwrite("min_prefix", &EngineConfig::min_prefix)
        .def_readwrite("prompt_cache", &EngineConfig::prompt_cache)
        .def_readwrite("cache_ram", &EngineConfig::cache_ram)
        .def_readwrite("min_rows", &EngineConfig::min_rows)
        .def_readwrite("backend_sampling", &EngineConfig::backend_sampling)
        .def_readwrite("verbose", &EngineConfig::verbose);

    py::enum_<Finish>(m, "Finish").value("stop", Finish::Stop).value("length", Finish::Length).value("error", Finish::Error);

    py::enum_<ErrorCode>(m, "ErrorCode")
        .value("none", ErrorCode::None)
        .value("empty_prompt", ErrorCode::EmptyPrompt)
        .value("prompt_too_long", ErrorCode::PromptTooLong)
        .value("invalid_prompt", ErrorCode::InvalidPrompt)
        .value("invalid_param", ErrorCode::InvalidParam)
        .value("no_kv_room", ErrorCode::NoKvRoom)
        .value("aborted", ErrorCode::Aborted);

    py::class_<Failure>(m, "Failure")
        .def_readonly("code", &Failure::code)
        .def_readonly("message", &Failure::message)
        .def("__bool__", [](const Failure & f) { return static_cast<bool>(f); });

    py::class_<Item>(m, "Item")
        .def(py::init<>())
        .def_readwrite("request", &Item::request)
        .def_readwrite("index", &Item::index)
        .def_readwrite("sample", &Item::sample)
        .def_readwrite("stream", &Item::stream)
        .def_readwrite("stream_interval", &Item::stream_interval)
        .def_readwrite("tokens", &Item::tokens)
        .def_readwrite("params", &Item::params);

    py::class_<Counters>(m, "Counters")
        .def_readonly("decode_calls", &Counters::decode_calls)
        .def_readonly("decode_retries", &Counters::decode_retries)
        .def_readonly("fallback_decodes", &Counters::fallback_decodes)
        .def_readonly("preemptions", &Counters::preemptions)
        .def_readonly("sequence_moves", &Counters::sequence_moves)
        .def_readonly("padding_rows", &Counters::padding_rows)
        .def_readonly("prompt_tokens", &Counters::prompt_tokens)
        .def_readonly("prefix_tokens_reused", &Counters::prefix_tokens_reused)
        .def_readonly("cached_prompt_tokens", &Counters::cached_prompt_tokens)
        .def_readonly("prompt_cache_hits", &Counters::prompt_cache_hits)
        .def_readonly("prompt_cache_misses", &Counters::prompt_cache_misses)
        .def_readonly("prompt_cache_evictions", &Counters::prompt_cache_evictions)
        .def_readonly("kv_copies", &Counters::kv_copies)
        .def_readonly("host_cache_hits", &Counters::host_cache_hits)
        .def_readonly("host_cached_tokens", &Counters::host_cached_tokens)
        .def_readonly("host_cache_saves", &Counters::host_cache_saves)
        .def_readonly("host_saved_tokens", &Counters::host_saved_tokens)
        .def_readonly("host_cache_evictions", &Counters::host_cache_evictions)
        .def_readonly("host_restore_failures", &Counters::host_restore_failures)
        .def_readonly("host_save_seconds", &Counters::host_save_seconds)
        .def_readonly("host_restore_seconds", &Counters::host_restore_seconds)
        .def_readonly("generated_tokens", &Counters::generated_tokens)
        .def_readonly("backend_sampled_tokens", &Counters::backend_sampled_tokens)
        .def_readonly("prompt_seconds", &Counters::prompt_seconds)
        .def_readonly("generation_seconds", &Counters::generation_seconds)
        .def_readonly("host_seconds", &Counters::host_seconds);

    py::class_<StreamDelta>(m, "StreamDelta")
        .def_readonly("request", &StreamDelta::request)
        .def_readonly("index", &StreamDelta::index)
        .def_readonly("sample", &StreamDelta::sample)
        .def_readonly("tokens", &StreamDelta::tokens)
        .def_property_readonly("text", [](const StreamDelta & d) { return py::bytes(d.text); })
        .def_property_readonly("logprobs", [](const StreamDelta & d) { return logprob_list(d.logprobs); });

    py::class_<Result>(m, "Result")
        .def_readonly("request", &Result::request)
        .def_readonly("index", &Result::index)
        .def_readonly("sample", &Result::sample)
        .def_readonly("n_prompt", &Result::n_prompt)
        .def_readonly("tokens", &Result::tokens)
        .def_property_readonly("text", [](const Result & r) { return py::bytes(r.text); })
        .def_readonly("finish", &Result::finish)
        .def_readonly("stop_string", &Result::stop_string)
        .def_readonly("stop_token", &Result::stop_token)
        .def_readonly("error_code", &Result::error_code)
        .def_readonly("error", &Result::error)
        .def_readonly("n_cached", &Result::n_cached)
        .def_property_readonly("logprobs", [](const Result & r) { return logprob_list(r.logprobs); });

    py::class_<StepOutput>(m, "StepOutput")
        .def_readonly("deltas", &StepOutput::deltas)
        .def_readonly("finished", &StepOutput::finished)
        .def_readonly("fatal", &StepOutput::fatal);

    py::class_<Engine>(m, "Engine")
        .def(py::init<std::shared_ptr<ModelHandle>, const EngineConfig &>(), py::arg("model"), py::arg("config"),
             py::call_guard<py::gil_scoped_release>())
        .def("check", &Engine::check, py::arg("request"), py::call_guard<py::gil_scoped_release>())
        .def("submit", [](Engine & e, Item r) {
                 py::gil_scoped_release release;
                 e.submit(std::move(r));
             }, py::arg("request"))
        .def("step",
             [](Engine & e) {
                 py::gil_scoped_release release;
                 return e.step();
             })
        .def("has_work", &Engine::has_work)
        .def("cancel_all", &Engine::cancel_all, py::call_guard<py::gil_scoped_release>())
        .def("cancel_request", &Engine::cancel_request, py::arg("request"), py::call_guard<py::gil_scoped_release>())
        .def("counters", &Engine::counters)
        .def("reset_counters", &Engine::reset_counters)
        .def("abort_after_decodes", &Engine::abort_after_decodes)
        .def("check_streams", &Engine::check_streams)
        .def_property_readonly("n_live", &Engine::n_live)
        .def_property_readonly("kv_tokens", &Engine::kv_tokens)
        .def_property_readonly("cached_tokens", &Engine::cached_tokens)
        .def_property_readonly("n_streams", &Engine::n_streams)
        .def_property_readonly("n_waiting", &Engine::n_waiting)
        .def_property_readonly("n_ctx", &Engine::n_ctx)
        .def_property_readonly("n_ctx_seq", &Engine::n_ctx_seq)
        .def_property_readonly("kv_capacity", &Engine::kv_capacity)
        .def_property_readonly("n_batch", &Engine::n_batch)
        .def_property_readonly("n_parallel", &Engine::n_parallel)
        .def_property_readonly("host_bytes", &Engine::host_bytes)
        .def_property_readonly("host_budget", &Engine::host_budget)
        .def_property_readonly("host_entries", &Engine::host_entries)
        .def_property_readonly("host_tokens", &Engine::host_tokens)
        .def_property_readonly("kv_fingerprint", &Engine::kv_fingerprint)
        .def("export_host",
             [](const Engine & e) {
                 py::list out;
                 for (const auto & b : e.export_host()) {
                     out.append(py::bytes(b));
                 }
                 return out;
             })
        .def("import_host", [](Engine & e, py::bytes b) { return e.import_host(std::string(b)); }, py::arg("entry"));

    // The host tier's bookkeeping alone (opaque states): budget, LRU, prefix-awareness and
    // the block index are tested on exact token layouts.
    py::class_<HostCache>(m, "HostCache")
        .def(py::init<size_t, int32_t>(), py::arg("budget_bytes"), py::arg("block") = 32)
        .def("put",
             [](HostCache & h, std::vector<HostToken> tokens, py::bytes state) {
                 HostEntry   e;
                 std::string st(state);
                 e.tokens = std::move(tokens);
                 e.state.assign(st.begin(), st.end());
                 switch (h.put(std::move(e))) {
                     case HostCache::Put::Stored: return "stored";
                     case HostCache::Put::Held: return "held";
                     default: return "too_large";
                 }
             },
             py::arg("tokens"), py::arg("state"))
        .def("longest",
             [](const HostCache & h, const std::vector<HostToken> & t, int32_t cap) {
                 const HostMatch m = h.longest(t.data(), static_cast<int32_t>(t.size()), cap);
                 return py::make_tuple(m.id, m.n);
             },
             py::arg("tokens"), py::arg("cap") = INT32_MAX)
        .def("tokens", [](const HostCache & h, int64_t id) { return h.get(id) ? h.get(id)->tokens : std::vector<HostToken>{}; })
        .def("touch", &HostCache::touch)
        .def("ids", &HostCache::ids)
        .def_property_readonly("bytes", &HostCache::bytes)
        .def_property_readonly("budget", &HostCache::budget)
        .def_property_readonly("evictions", &HostCache::evictions)
        .def("__len__", &HostCache::size);

    // The stream table and the placement cost model alone (tests).
    py::class_<TestStreams>(m, "StreamTable")
        .def(py::init<int32_t>(), py::arg("n_streams"))
        .def("__len__", [](const TestStreams & t) { return t.table.size(); })
        .def("occupy",
             [](TestStreams & t, int32_t id, std::vector<StreamToken> tokens, int32_t n_past) {
                 if (n_past < 0 || n_past > static_cast<int32_t>(tokens.size())) {
                     throw py::value_error("n_past outside the tokens");
                 }
                 auto s    = std::make_unique<Sequence>();
                 s->tokens = std::move(tokens);
                 s->n_past = n_past;
                 s->seq_id = id;
                 s->state  = SeqState::Prefilling;
                 t.table.occupy(id, std::move(s));
             },
             py::arg("id"), py::arg("tokens"), py::arg("n_past"))
        .def("decode",  // a running sequence's KV grows by `tokens` (the index sees it at sync())
             [](TestStreams & t, int32_t id, const std::vector<StreamToken> & tokens) {
                 Sequence & s = t.seq(id);
                 s.tokens.resize(static_cast<size_t>(s.n_past));
                 s.tokens.insert(s.tokens.end(), tokens.begin(), tokens.end());
                 s.n_past = static_cast<int32_t>(s.tokens.size());
             })
        .def("finish",  // as Engine::finish: the stream keeps the sequence's KV as an entry, or none
             [](TestStreams & t, int32_t id, bool keep) {
                 Sequence & s = t.seq(id);
                 if (keep) {
                     t.table.keep(id, s.tokens.data(), s.n_past);
                 }
                 s.state = SeqState::Done;
             },
             py::arg("id"), py::arg("keep") = true)
        .def("release", [](TestStreams & t, int32_t id) { t.table.release(id); })
        .def("move_seq", [](TestStreams & t, int32_t from, int32_t to) {
            t.table.move_seq(from, to);
            t.seq(to).seq_id = to;
        })
        .def("set_prefix",
             [](TestStreams & t, int32_t id, std::vector<StreamToken> tokens, int32_t n) {
                 t.prefix = std::move(tokens);
                 t.table.set_prefix(id, t.prefix.data(), n);
             })
        .def("prefix_decoded", [](TestStreams & t, int32_t n) { t.table.prefix_decoded(n); })
        .def("clear_prefix", [](TestStreams & t) { t.table.clear_prefix(); })
        .def_property_readonly("prefix", [](const TestStreams & t) { return t.table.prefix(); })
        .def("keep", [](TestStreams & t, int32_t id, const std::vector<StreamToken> & tokens) {
            t.table.keep(id, tokens.data(), static_cast<int32_t>(tokens.size()));
        })
        .def("drop", [](TestStreams & t, int32_t id) { t.table.drop(id); })
        .def("move_entry", [](TestStreams & t, int32_t from, int32_t to) { t.table.move_entry(from, to); })
        .def("touch", [](TestStreams & t, int32_t id) { t.table.touch(id); })
        .def("sync", [](TestStreams & t) { t.table.sync(); })
        .def("entry", [](const TestStreams & t, int32_t id) { return t.table.entry(id); })
        .def("held",
             [](const TestStreams & t, int32_t id) {
                 const Held h = t.table.held(id);
                 return std::vector<StreamToken>(h.data, h.data + h.n);
             })
        .def("is_free", [](const TestStreams & t, int32_t id) { return t.table.is_free(id); })
        .def("lost", [](const TestStreams & t, int32_t id) { return t.table.lost(id); })
        .def("last_used", [](const TestStreams & t, int32_t id) { return t.table.last_used(id); })
        .def_property_readonly("cached_tokens", [](const TestStreams & t) { return t.table.cached_tokens(); })
        .def("oldest_entry", [](const TestStreams & t, int32_t a, int32_t b) { return t.table.oldest_entry(a, b); },
             py::arg("spare_a") = -1, py::arg("spare_b") = -1)
        .def("victim",
             [](const TestStreams & t, int32_t avoid, int32_t lo, int32_t hi, bool low) {
                 return t.table.victim(avoid, lo, hi, low);
             },
             py::arg("avoid") = -1, py::arg("lo") = -1, py::arg("hi") = -1, py::arg("low") = true)
        .def("longest",
             [](const TestStreams & t, const std::vector<StreamToken> & q, int32_t cap, bool free_only) {
                 const StreamMatch m = t.table.longest(q.data(), static_cast<int32_t>(q.size()), cap, free_only,
                                                       [](int32_t, int32_t) { return true; });
                 return py::make_tuple(m.id, m.n);
             },
             py::arg("tokens"), py::arg("cap") = INT32_MAX, py::arg("free_only") = false)
        .def("check", [](const TestStreams & t) { return t.table.check(); });

    m.def("place_value", [](const py::dict & option, bool unified) { return place_value(place_option(option), unified); },
          py::arg("option"), py::arg("unified") = false);
    m.def("place_choice",  // the index of the option admission takes
          [](const py::list & options, bool unified) {
              PlaceChoice c(unified);
              int64_t     chosen = -1;
              for (size_t i = 0; i < options.size(); ++i) {
                  PlaceOption o = place_option(options[i].cast<py::dict>());
                  o.stream      = static_cast<int32_t>(i);  // tells the chosen one apart
                  c.consider(o);
                  chosen = c.best().stream;
              }
              return chosen;
          },
          py::arg("options"), py::arg("unified") = false);

    // Exposed so the stop-string and UTF-8 logic can be tested on exact byte splits.
    py::class_<TextAssembler>(m, "TextAssembler")
        .def(py::init<std::vector<std::string>>(), py::arg("stops") = std::vector<std::string>{})
        .def("append", [](TextAssembler & t, py::bytes piece) { return t.append(std::string(piece)); })
        .def_property_readonly("matched_stop", &TextAssembler::matched_stop)
        .def_property_readonly("bytes", [](const TextAssembler & t) { return py::bytes(t.bytes()); })
        .def_property_readonly("stable_len", &TextAssembler::stable_len)
        .def("final_bytes", [](const TextAssembler & t) { return py::bytes(t.final_bytes()); });
}
