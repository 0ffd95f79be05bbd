/*
 * hsiedge SelectiveScan TensorRT plugin (DESIGN.md Contract 2), written against the
 * TensorRT 10 IPluginV3 API.
 *
 * Node: op_type "SelectiveScan", domain / plugin namespace "hsiedge", plugin version "1".
 * Inputs, in this order: u, delta, A, B, C, D, z, delta_bias (the last three optional);
 * output y with the shape and element type of u.  The scan itself is hsiedge::scanLaunch
 * (selective_scan.h); this file only maps TensorRT tensors onto ScanParams.
 *
 * Optional inputs.  Exports write all eight inputs with empty names for absent ones; the
 * TensorRT 10 ONNX parser hands those to the layer as null tensors, so the plugin sees
 * eight inputs.  A graph may instead omit trailing optional inputs (five to seven inputs).
 * Which optional inputs exist is kept in the int32 fields has_D, has_z, has_delta_bias
 * (1 present, 0 absent, -1 or missing: decide from the number of inputs); with eight
 * inputs an optional input that is null, has no dimensions or holds no element counts as
 * absent too.
 *
 * The library exports getCreators() and setLoggerFinder(), the entry points that
 * IPluginRegistry::loadLibrary and trtexec --dynamicPlugins look up.  Built with
 * HSIEDGE_TRT_REGISTER_ON_LOAD it also registers its creator when it is loaded (for
 * trtexec --staticPlugins or a plain dlopen); that build links libnvinfer.
 */

#include "selective_scan.h"

#include <NvInferRuntime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

#define HSIEDGE_TRT_EXPORT __attribute__((visibility("default")))

namespace
{

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ErrorCode;
using nvinfer1::IErrorRecorder;
using nvinfer1::IExprBuilder;
using nvinfer1::ILogger;
using nvinfer1::ILoggerFinder;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginCreatorInterface;
using nvinfer1::IPluginCreatorV3One;
using nvinfer1::IPluginResourceContext;
using nvinfer1::IPluginV3;
using nvinfer1::IPluginV3OneBuild;
using nvinfer1::IPluginV3OneCore;
using nvinfer1::IPluginV3OneRuntime;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;
using nvinfer1::TensorRTPhase;

constexpr char const* kPluginName = "SelectiveScan";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "hsiedge";

// Field names: the node's attributes, then what only serialisation carries.
constexpr char const* kFieldSoftplus = "delta_softplus";
constexpr char const* kFieldHasD = "has_D";
constexpr char const* kFieldHasZ = "has_z";
constexpr char const* kFieldHasDeltaBias = "has_delta_bias";
constexpr char const* kFieldVersion = "plugin_version";
constexpr char const* kFieldNamespace = "plugin_namespace";
constexpr char const* kFieldNbInputs = "nb_inputs";
constexpr char const* kFieldSmCount = "sm_count";
constexpr char const* kFieldWorkspace = "workspace_bytes";

// Input roles in Contract 2 order.  The first five are required.
enum Role : int32_t
{
    kU = 0,
    kDelta,
    kA,
    kB,
    kC,
    kD,
    kZ,
    kDeltaBias,
    kNbRoles
};
constexpr int32_t kNbRequired = 5;
constexpr int32_t kNbOptional = kNbRoles - kNbRequired;
constexpr std::array<char const*, kNbRoles> kRoleNames{"u", "delta", "A", "B", "C", "D", "z", "delta_bias"};
constexpr int64_t kMaxN = 256; // selective_scan.h: N in 1..256

// Role -> input index, -1 for an optional input the layer does not have.
using Slots = std::array<int32_t, kNbRoles>;
// has_D, has_z, has_delta_bias: 1 present, 0 absent, -1 decided by the number of inputs.
using Presence = std::array<int32_t, kNbOptional>;

// ---------------------------------------------------------------------------------------
// Logging: through the logger TensorRT hands over in setLoggerFinder, else stderr for
// warnings and errors.

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void logMessage(ILogger::Severity severity, char const* msg) noexcept
{
    ILogger* logger = nullptr;
    if (ILoggerFinder* finder = gLoggerFinder.load())
    {
        try
        {
            logger = finder->findLogger();
        }
        catch (...)
        {
            logger = nullptr;
        }
    }
    if (logger)
    {
        logger->log(severity, msg);
    }
    else if (severity == ILogger::Severity::kERROR || severity == ILogger::Severity::kINTERNAL_ERROR
        || severity == ILogger::Severity::kWARNING)
    {
        std::fprintf(stderr, "%s\n", msg);
    }
}

// "hsiedge SelectiveScan plugin (layer): what"; empty if that cannot be built.
std::string composeMessage(std::string const& layer, char const* what) noexcept
{
    try
    {
        std::string msg = "hsiedge SelectiveScan plugin";
        if (!layer.empty())
        {
            msg += " (" + layer + ")";
        }
        return msg + ": " + what;
    }
    catch (...)
    {
        return std::string();
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers on dims and fields.

// Element count, -1 when a dimension is unknown (wildcard) or the dims are invalid.
int64_t volume(Dims const& d) noexcept
{
    if (d.nbDims < 0)
    {
        return -1;
    }
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        if (d.d[i] < 0)
        {
            return -1;
        }
        v *= d.d[i];
    }
    return v;
}

// True when an optional input's dims say "no tensor": no rank or a static zero extent.
bool looksAbsent(Dims const& d) noexcept
{
    if (d.nbDims <= 0)
    {
        return true;
    }
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        if (d.d[i] == 0)
        {
            return true;
        }
    }
    return false;
}

// Two extents agree when either is a wildcard (-1) or they are equal.
bool agree(int64_t a, int64_t b) noexcept
{
    return a < 0 || b < 0 || a == b;
}

bool isOptional(int32_t role) noexcept
{
    return role >= kNbRequired && role < kNbRoles;
}

// Map roles to input indices for `nbInputs` inputs.  Eight inputs are positional (an
// explicit 0 drops that input); five to seven inputs hold the required ones followed by
// the present optional ones, undecided flags taking the remaining inputs in order.
bool resolveSlots(Presence const& has, int32_t nbInputs, Slots& slots) noexcept
{
    if (nbInputs < kNbRequired || nbInputs > kNbRoles)
    {
        return false;
    }
    for (int32_t r = 0; r < kNbRequired; ++r)
    {
        slots[r] = r;
    }
    if (nbInputs == kNbRoles)
    {
        for (int32_t k = 0; k < kNbOptional; ++k)
        {
            slots[kNbRequired + k] = has[k] == 0 ? -1 : kNbRequired + k;
        }
        return true;
    }
    int32_t const given = nbInputs - kNbRequired;
    int32_t const explicitPresent = static_cast<int32_t>(std::count(has.begin(), has.end(), 1));
    int32_t const undecided = static_cast<int32_t>(std::count(has.begin(), has.end(), -1));
    if (given < explicitPresent || given > explicitPresent + undecided)
    {
        return false;
    }
    int32_t autoLeft = given - explicitPresent;
    int32_t next = kNbRequired;
    for (int32_t k = 0; k < kNbOptional; ++k)
    {
        bool present = has[k] == 1;
        if (has[k] == -1 && autoLeft > 0)
        {
            present = true;
            --autoLeft;
        }
        slots[kNbRequired + k] = present ? next++ : -1;
    }
    return true;
}

std::string slotsError(Presence const& has, int32_t nbInputs)
{
    return "cannot match " + std::to_string(nbInputs) + " inputs to (u, delta, A, B, C, D, z, delta_bias) with has_D="
        + std::to_string(has[0]) + ", has_z=" + std::to_string(has[1]) + ", has_delta_bias=" + std::to_string(has[2])
        + " (expected 5 to 8 inputs)";
}

bool isScanType(DataType t) noexcept
{
    return t == DataType::kFLOAT || t == DataType::kHALF;
}

// One integer of type T from a plugin field's (possibly unaligned) data.
template <typename T>
int64_t readScalar(void const* data) noexcept
{
    T v;
    std::memcpy(&v, data, sizeof(v));
    return static_cast<int64_t>(v);
}

// Read an integer field of any integer PluginFieldType.
bool readIntField(PluginField const& f, int64_t& out) noexcept
{
    if (f.data == nullptr || f.length < 1)
    {
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kINT8: out = readScalar<int8_t>(f.data); return true;
    case PluginFieldType::kINT16: out = readScalar<int16_t>(f.data); return true;
    case PluginFieldType::kINT32: out = readScalar<int32_t>(f.data); return true;
    case PluginFieldType::kINT64: out = readScalar<int64_t>(f.data); return true;
    default: return false;
    }
}

// Read a kCHAR field; its length may or may not count a terminating NUL.
bool readStringField(PluginField const& f, std::string& out)
{
    if (f.type != PluginFieldType::kCHAR || f.length < 0 || (f.data == nullptr && f.length > 0))
    {
        return false;
    }
    char const* s = static_cast<char const*>(f.data);
    size_t n = static_cast<size_t>(f.length);
    size_t len = 0;
    while (len < n && s[len] != '\0')
    {
        ++len;
    }
    out.assign(s, len);
    return true;
}

// ---------------------------------------------------------------------------------------
// Shape checks shared by configurePlugin (dims may hold -1 wildcards) and onShapeChange.
// `dims[r]` is null for a role without an input.  Returns an empty string when the shapes
// fit Contract 2, else what is wrong.

std::string checkShapes(std::array<Dims const*, kNbRoles> const& dims)
{
    auto shape = [](Dims const& d) {
        std::string s = "(";
        for (int32_t i = 0; i < d.nbDims; ++i)
        {
            s += (i ? ", " : "") + std::to_string(d.d[i]);
        }
        return s + ")";
    };
    auto bad = [&](int32_t role, char const* expected) {
        return std::string(kRoleNames[role]) + " has shape " + shape(*dims[role]) + ", expected " + expected;
    };

    Dims const& u = *dims[kU];
    if (u.nbDims != 3)
    {
        return bad(kU, "(batch, dim, L)");
    }
    int64_t const batch = u.d[0];
    int64_t const dim = u.d[1];
    int64_t const L = u.d[2];

    Dims const& delta = *dims[kDelta];
    if (delta.nbDims != 3 || !agree(delta.d[0], batch) || !agree(delta.d[1], dim) || !agree(delta.d[2], L))
    {
        return bad(kDelta, "the shape of u (batch, dim, L)");
    }

    Dims const& A = *dims[kA];
    if (A.nbDims != 2 || !agree(A.d[0], dim))
    {
        return bad(kA, "(dim, N)");
    }
    int64_t const N = A.d[1];
    if (N >= 0 && (N < 1 || N > kMaxN))
    {
        return bad(kA, "(dim, N) with N between 1 and 256");
    }

    Dims const& B = *dims[kB];
    if (B.nbDims != 3 && B.nbDims != 4)
    {
        return bad(kB, "(batch, N, L) or (batch, groups, N, L)");
    }
    bool const grouped = B.nbDims == 4;
    int64_t const groups = grouped ? B.d[1] : 1;
    int64_t const nB = grouped ? B.d[2] : B.d[1];
    int64_t const lB = grouped ? B.d[3] : B.d[2];
    if (!agree(B.d[0], batch) || !agree(nB, N) || !agree(lB, L))
    {
        return bad(kB, "(batch, N, L) or (batch, groups, N, L) matching u and A");
    }
    if (groups == 0 || (groups > 0 && dim > 0 && dim % groups != 0))
    {
        return bad(kB, "(batch, groups, N, L) with dim a multiple of groups");
    }

    Dims const& C = *dims[kC];
    bool sameAsB = C.nbDims == B.nbDims;
    for (int32_t i = 0; sameAsB && i < B.nbDims; ++i)
    {
        sameAsB = agree(C.d[i], B.d[i]);
    }
    if (!sameAsB)
    {
        return bad(kC, "the shape of B");
    }

    for (int32_t role : {kD, kDeltaBias})
    {
        if (dims[role] && !looksAbsent(*dims[role]) && (dims[role]->nbDims != 1 || !agree(dims[role]->d[0], dim)))
        {
            return bad(role, "(dim,)");
        }
    }
    if (dims[kZ] && !looksAbsent(*dims[kZ]))
    {
        Dims const& z = *dims[kZ];
        if (z.nbDims != 3 || !agree(z.d[0], batch) || !agree(z.d[1], dim) || !agree(z.d[2], L))
        {
            return bad(kZ, "the shape of u (batch, dim, L)");
        }
    }
    return std::string();
}

// Element types: u, delta, B, C, z and y share float32 or float16; A, D, delta_bias are
// float32.  `types[r]` is null for a role without an input (or an absent optional one).
std::string checkTypes(std::array<DataType const*, kNbRoles> const& types, DataType outType)
{
    DataType const t = *types[kU];
    if (!isScanType(t))
    {
        return "u must be float32 or float16";
    }
    for (int32_t role : {kDelta, kB, kC, kZ})
    {
        if (types[role] && *types[role] != t)
        {
            return std::string(kRoleNames[role]) + " must have the element type of u";
        }
    }
    for (int32_t role : {kA, kD, kDeltaBias})
    {
        if (types[role] && *types[role] != DataType::kFLOAT)
        {
            return std::string(kRoleNames[role]) + " must be float32";
        }
    }
    if (outType != t)
    {
        return "y must have the element type of u";
    }
    return std::string();
}

// ---------------------------------------------------------------------------------------
// Workspace sizing.  TensorRT reserves one size per layer and profile that must cover every
// shape the profile admits; scanWorkspaceBytes never decreases as the dimensions grow, so
// its value at the profile's maximum dimensions covers them all.

int64_t maxExtent(DynamicPluginTensorDesc const& t, int32_t axis) noexcept
{
    int64_t const fixed = t.desc.dims.nbDims > axis ? t.desc.dims.d[axis] : -1;
    return fixed >= 0 ? fixed : t.max.d[axis];
}

int64_t workspaceBound(std::array<DynamicPluginTensorDesc const*, kNbRoles> const& in, hsiedge::ScanDType dtype,
    bool softplus, int32_t smCount)
{
    DynamicPluginTensorDesc const& u = *in[kU];
    DynamicPluginTensorDesc const& B = *in[kB];
    hsiedge::ScanParams p{};
    p.delta_softplus = softplus;
    p.dtype = dtype;
    p.batch = maxExtent(u, 0);
    p.dim = maxExtent(u, 1);
    p.L = maxExtent(u, 2);
    p.N = maxExtent(*in[kA], 1);
    p.groups = B.desc.dims.nbDims == 4 ? maxExtent(B, 1) : 1;
    size_t const bytes = hsiedge::scanWorkspaceBytes(p, smCount);
    return static_cast<int64_t>(std::min<size_t>(bytes, static_cast<size_t>(std::numeric_limits<int64_t>::max())));
}

int32_t currentSmCount() noexcept
{
    int device = 0;
    int sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    {
        static_cast<void>(cudaGetLastError()); // do not leave a sticky error for TensorRT
        return 0;                              // the launcher then assumes a default
    }
    return sms;
}

// ---------------------------------------------------------------------------------------
// The plugin.

struct ScanConfig
{
    int32_t deltaSoftplus{0};
    Presence has{-1, -1, -1};
    int32_t nbInputs{0};        // 0 until the layer's inputs are known
    int32_t smCount{0};         // SM count the workspace is sized for; also used at launch
    int64_t workspaceBytes{-1}; // largest reservation asked for, -1 unknown
};

class SelectiveScanPlugin final : public IPluginV3,
                                  public IPluginV3OneCore,
                                  public IPluginV3OneBuild,
                                  public IPluginV3OneRuntime
{
public:
    SelectiveScanPlugin(std::string layerName, ScanConfig const& config)
        : mLayerName(std::move(layerName))
        , mConfig(config)
    {
        mCacheId = std::string(kPluginNamespace) + "::" + kPluginName + "/" + kPluginVersion
            + "/softplus=" + std::to_string(mConfig.deltaSoftplus) + "/has=" + std::to_string(mConfig.has[0]) + ","
            + std::to_string(mConfig.has[1]) + "," + std::to_string(mConfig.has[2]);
    }

    SelectiveScanPlugin(SelectiveScanPlugin const&) = default;
    SelectiveScanPlugin& operator=(SelectiveScanPlugin const&) = delete;
    ~SelectiveScanPlugin() override = default;

    // IPluginV3

    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new SelectiveScanPlugin(*this);
        }
        catch (...)
        {
            report(ErrorCode::kFAILED_ALLOCATION, "out of memory while cloning");
            return nullptr;
        }
    }

    // IPluginV3OneCore

    char const* getPluginName() const noexcept override
    {
        return kPluginName;
    }

    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    // IPluginV3OneBuild

    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs < 1 || !isScanType(inputTypes[0]))
        {
            report(ErrorCode::kINVALID_ARGUMENT, "u must be float32 or float16 and there is one output");
            return -1;
        }
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept override
    {
        try
        {
            Slots slots{};
            if (!resolveSlots(mConfig.has, nbInputs, slots))
            {
                report(ErrorCode::kINVALID_ARGUMENT, slotsError(mConfig.has, nbInputs));
                return -1;
            }
            if (nbOutputs != 1 || nbShapeInputs != 0 || inputs[kU].nbDims != 3)
            {
                report(ErrorCode::kINVALID_ARGUMENT, "expected u of shape (batch, dim, L), one output, no shape inputs");
                return -1;
            }
            outputs[0] = inputs[kU]; // y has the shape of u
            return 0;
        }
        catch (...)
        {
            return -1;
        }
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        Slots slots{};
        if (nbOutputs != 1 || pos < 0 || pos > nbInputs || !resolveSlots(mConfig.has, nbInputs, slots))
        {
            return false;
        }
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        if (pos == nbInputs)
        {
            return desc.type == inOut[slots[kU]].desc.type; // y
        }
        int32_t role = -1;
        for (int32_t r = 0; r < kNbRoles; ++r)
        {
            if (slots[r] == pos)
            {
                role = r;
            }
        }
        if (role < 0 || (isOptional(role) && looksAbsent(desc.dims)))
        {
            return true; // an input the scan ignores: any linear tensor will do
        }
        switch (role)
        {
        case kU: return isScanType(desc.type);
        case kA:
        case kD:
        case kDeltaBias: return desc.type == DataType::kFLOAT;
        default: return desc.type == inOut[slots[kU]].desc.type; // delta, B, C, z (u is input 0)
        }
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override
    {
        try
        {
            Slots slots{};
            if (!resolveSlots(mConfig.has, nbInputs, slots) || nbOutputs != 1)
            {
                report(ErrorCode::kINVALID_ARGUMENT, slotsError(mConfig.has, nbInputs));
                return -1;
            }
            std::array<Dims const*, kNbRoles> dims{};
            std::array<DataType const*, kNbRoles> types{};
            std::array<DynamicPluginTensorDesc const*, kNbRoles> descs{};
            for (int32_t r = 0; r < kNbRoles; ++r)
            {
                if (slots[r] >= 0 && !(isOptional(r) && looksAbsent(in[slots[r]].desc.dims)))
                {
                    dims[r] = &in[slots[r]].desc.dims;
                    types[r] = &in[slots[r]].desc.type;
                    descs[r] = &in[slots[r]];
                }
            }
            std::string problem = checkShapes(dims);
            if (problem.empty())
            {
                problem = checkTypes(types, out[0].desc.type);
            }
            if (problem.empty() && out[0].desc.dims.nbDims != 3)
            {
                problem = "y must have the shape of u";
            }
            if (!problem.empty())
            {
                report(ErrorCode::kINVALID_ARGUMENT, problem);
                return -1;
            }
            rememberInputs(nbInputs);
            if (mConfig.smCount <= 0)
            {
                mConfig.smCount = currentSmCount();
            }
            int64_t const bound = workspaceBound(descs, scanType(*types[kU]), mConfig.deltaSoftplus != 0, mConfig.smCount);
            mConfig.workspaceBytes = std::max(mConfig.workspaceBytes, bound);
            return 0;
        }
        catch (...)
        {
            report(ErrorCode::kINTERNAL_ERROR, "configurePlugin failed");
            return -1;
        }
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        try
        {
            Slots slots{};
            if (!resolveSlots(mConfig.has, nbInputs, slots))
            {
                return 0;
            }
            std::array<DynamicPluginTensorDesc const*, kNbRoles> descs{};
            for (int32_t r = 0; r < kNbRoles; ++r)
            {
                descs[r] = slots[r] >= 0 ? &inputs[slots[r]] : nullptr;
            }
            if (descs[kU]->desc.dims.nbDims != 3 || descs[kA]->desc.dims.nbDims != 2
                || !isScanType(descs[kU]->desc.type))
            {
                return 0; // configurePlugin reports the shapes
            }
            int32_t const sms = mConfig.smCount > 0 ? mConfig.smCount : currentSmCount();
            int64_t const bound
                = workspaceBound(descs, scanType(descs[kU]->desc.type), mConfig.deltaSoftplus != 0, sms);
            return static_cast<size_t>(bound);
        }
        catch (...)
        {
            report(ErrorCode::kINTERNAL_ERROR, "getWorkspaceSize failed");
            return 0;
        }
    }

    char const* getTimingCacheID() noexcept override
    {
        return mCacheId.c_str();
    }

    char const* getMetadataString() noexcept override
    {
        return mCacheId.c_str();
    }

    // IPluginV3OneRuntime

    int32_t onShapeChange(
        PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        try
        {
            Slots slots{};
            if (!resolveSlots(mConfig.has, nbInputs, slots) || nbOutputs != 1)
            {
                report(ErrorCode::kINVALID_ARGUMENT, slotsError(mConfig.has, nbInputs));
                return -1;
            }
            std::array<Dims const*, kNbRoles> dims{};
            std::array<DataType const*, kNbRoles> types{};
            for (int32_t r = 0; r < kNbRoles; ++r)
            {
                if (slots[r] >= 0 && !(isOptional(r) && looksAbsent(in[slots[r]].dims)))
                {
                    dims[r] = &in[slots[r]].dims;
                    types[r] = &in[slots[r]].type;
                }
            }
            std::string problem = checkShapes(dims);
            if (problem.empty())
            {
                problem = checkTypes(types, out[0].type);
            }
            if (problem.empty())
            {
                Dims const& u = in[kU].dims;
                Dims const& y = out[0].dims;
                bool same = y.nbDims == u.nbDims;
                for (int32_t i = 0; same && i < u.nbDims; ++i)
                {
                    same = y.d[i] == u.d[i];
                }
                if (!same)
                {
                    problem = "y must have the shape of u";
                }
            }
            if (!problem.empty())
            {
                report(ErrorCode::kINVALID_ARGUMENT, problem);
                return -1;
            }
            rememberInputs(nbInputs);
            if (mConfig.smCount <= 0)
            {
                mConfig.smCount = currentSmCount();
            }
            return 0;
        }
        catch (...)
        {
            report(ErrorCode::kINTERNAL_ERROR, "onShapeChange failed");
            return -1;
        }
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Slots slots{};
        if (!resolveSlots(mConfig.has, mConfig.nbInputs, slots))
        {
            report(ErrorCode::kINVALID_STATE, "enqueue before the layer's inputs are known");
            return -1;
        }
        Dims const& u = inputDesc[kU].dims;
        if (volume(u) == 0)
        {
            return 0; // empty batch or sequence: nothing to write
        }
        DataType const t = inputDesc[kU].type;
        if (!isScanType(t) || u.nbDims != 3)
        {
            report(ErrorCode::kINVALID_ARGUMENT, "u must be a float32 or float16 (batch, dim, L) tensor");
            return -1;
        }
        // An optional input counts only when the layer has it and it holds elements.
        auto optional = [&](int32_t role) -> void const* {
            int32_t const i = slots[role];
            if (i < 0 || inputs[i] == nullptr || volume(inputDesc[i].dims) <= 0)
            {
                return nullptr;
            }
            return inputs[i];
        };
        Dims const& B = inputDesc[kB].dims;

        hsiedge::ScanParams p{};
        p.u = inputs[kU];
        p.delta = inputs[kDelta];
        p.A = static_cast<float const*>(inputs[kA]);
        p.B = inputs[kB];
        p.C = inputs[kC];
        p.D = static_cast<float const*>(optional(kD));
        p.z = optional(kZ);
        p.delta_bias = static_cast<float const*>(optional(kDeltaBias));
        p.y = outputs[0];
        p.batch = u.d[0];
        p.dim = u.d[1];
        p.L = u.d[2];
        p.N = inputDesc[kA].dims.nbDims == 2 ? inputDesc[kA].dims.d[1] : 0;
        p.groups = B.nbDims == 4 ? B.d[1] : 1;
        p.delta_softplus = mConfig.deltaSoftplus != 0;
        p.dtype = scanType(t);

        int32_t const status = hsiedge::scanCheck(p);
        if (status != 0)
        {
            report(ErrorCode::kINVALID_ARGUMENT, hsiedge::scanStatusString(status));
            return -1;
        }
        size_t const need = hsiedge::scanWorkspaceBytes(p, mConfig.smCount);
        bool const tooSmall
            = mConfig.workspaceBytes >= 0 && need > static_cast<uint64_t>(mConfig.workspaceBytes);
        if (need > 0 && (workspace == nullptr || tooSmall))
        {
            report(ErrorCode::kFAILED_EXECUTION,
                "these shapes need more scan workspace than the engine reserved; rebuild the engine with this shape "
                "inside its optimization profile");
            return -1;
        }
        cudaError_t const err = hsiedge::scanLaunch(p, workspace, mConfig.smCount, stream);
        if (err != cudaSuccess)
        {
            report(ErrorCode::kFAILED_EXECUTION, cudaGetErrorString(err));
            return -1;
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override
    {
        IPluginV3* copy = clone();
        if (copy != nullptr && context != nullptr)
        {
            static_cast<SelectiveScanPlugin*>(copy)->mRecorder = context->getErrorRecorder();
        }
        return copy;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        // Decided presence once the inputs are known, so the engine never has to guess.
        Slots slots{};
        bool const known = resolveSlots(mConfig.has, mConfig.nbInputs, slots);
        for (int32_t k = 0; k < kNbOptional; ++k)
        {
            mSerialHas[k] = known ? (slots[kNbRequired + k] >= 0 ? 1 : 0) : mConfig.has[k];
        }
        mSerialFields[0] = PluginField(kFieldSoftplus, &mConfig.deltaSoftplus, PluginFieldType::kINT32, 1);
        mSerialFields[1] = PluginField(kFieldHasD, &mSerialHas[0], PluginFieldType::kINT32, 1);
        mSerialFields[2] = PluginField(kFieldHasZ, &mSerialHas[1], PluginFieldType::kINT32, 1);
        mSerialFields[3] = PluginField(kFieldHasDeltaBias, &mSerialHas[2], PluginFieldType::kINT32, 1);
        mSerialFields[4] = PluginField(kFieldNbInputs, &mConfig.nbInputs, PluginFieldType::kINT32, 1);
        mSerialFields[5] = PluginField(kFieldSmCount, &mConfig.smCount, PluginFieldType::kINT32, 1);
        mSerialFields[6] = PluginField(kFieldWorkspace, &mConfig.workspaceBytes, PluginFieldType::kINT64, 1);
        mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
        mSerialCollection.fields = mSerialFields.data();
        return &mSerialCollection;
    }

private:
    static hsiedge::ScanDType scanType(DataType t) noexcept
    {
        return t == DataType::kHALF ? hsiedge::ScanDType::kFloat16 : hsiedge::ScanDType::kFloat32;
    }

    // enqueue does not get the number of inputs, so keep it.
    void rememberInputs(int32_t nbInputs) noexcept
    {
        mConfig.nbInputs = nbInputs;
    }

    // Errors go to the execution context's error recorder when there is one, else the log.
    void report(ErrorCode code, char const* what) const noexcept
    {
        std::string const msg = composeMessage(mLayerName, what);
        char const* text = msg.empty() ? what : msg.c_str();
        if (mRecorder != nullptr)
        {
            mRecorder->reportError(code, text);
        }
        else
        {
            logMessage(ILogger::Severity::kERROR, text);
        }
    }

    void report(ErrorCode code, std::string const& what) const noexcept
    {
        report(code, what.c_str());
    }

    std::string mLayerName;
    ScanConfig mConfig;
    std::string mCacheId;
    IErrorRecorder* mRecorder{nullptr};
    // Storage behind getFieldsToSerialize; rebuilt on each call, so copies need no fix-up.
    std::array<int32_t, kNbOptional> mSerialHas{};
    std::array<PluginField, 7> mSerialFields{};
    PluginFieldCollection mSerialCollection{};
};

// ---------------------------------------------------------------------------------------
// The creator.

class SelectiveScanCreator final : public IPluginCreatorV3One
{
public:
    SelectiveScanCreator()
    {
        // What the ONNX parser copies from node attributes: exactly the ones an exported node
        // has (listing more makes the parser warn for each node).  has_* come back only from
        // serialised engines, where parseFields reads them.
        mFields[0] = PluginField(kFieldSoftplus, nullptr, PluginFieldType::kINT32, 1);
        mFields[1] = PluginField(kFieldVersion, nullptr, PluginFieldType::kCHAR, 0);
        mFields[2] = PluginField(kFieldNamespace, nullptr, PluginFieldType::kCHAR, 0);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    char const* getPluginName() const noexcept override
    {
        return kPluginName;
    }

    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mCollection;
    }

    IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override
    {
        std::string layer;
        try
        {
            layer = name != nullptr ? name : "";
            ScanConfig config;
            std::string problem = parseFields(fc, config);
            if (!problem.empty())
            {
                logMessage(ILogger::Severity::kERROR, composeMessage(layer, problem.c_str()).c_str());
                return nullptr;
            }
            if (phase == TensorRTPhase::kBUILD && config.smCount <= 0)
            {
                // Size the workspace for the GPU the engine is built on; every copy keeps it.
                config.smCount = currentSmCount();
            }
            return new SelectiveScanPlugin(layer, config);
        }
        catch (...)
        {
            logMessage(ILogger::Severity::kERROR, composeMessage(layer, "could not create the plugin").c_str());
            return nullptr;
        }
    }

private:
    // Fill `config` from the fields; returns what is wrong, or an empty string.
    static std::string parseFields(PluginFieldCollection const* fc, ScanConfig& config)
    {
        if (fc == nullptr || fc->nbFields <= 0)
        {
            return std::string();
        }
        if (fc->fields == nullptr)
        {
            return "null plugin field array";
        }
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
            {
                continue;
            }
            std::string const name = f.name;
            int64_t v = 0;
            std::string s;
            if (name == kFieldSoftplus)
            {
                if (!readIntField(f, v) || (v != 0 && v != 1))
                {
                    return "delta_softplus must be an integer 0 or 1";
                }
                config.deltaSoftplus = static_cast<int32_t>(v);
            }
            else if (name == kFieldHasD || name == kFieldHasZ || name == kFieldHasDeltaBias)
            {
                if (!readIntField(f, v) || v < -1 || v > 1)
                {
                    return name + " must be an integer 1 (present), 0 (absent) or -1 (from the input count)";
                }
                size_t const k = name == kFieldHasD ? 0 : name == kFieldHasZ ? 1 : 2;
                config.has[k] = static_cast<int32_t>(v);
            }
            else if (name == kFieldNbInputs)
            {
                if (!readIntField(f, v) || (v != 0 && (v < kNbRequired || v > kNbRoles)))
                {
                    return "nb_inputs must be 0 or between 5 and 8";
                }
                config.nbInputs = static_cast<int32_t>(v);
            }
            else if (name == kFieldSmCount)
            {
                if (!readIntField(f, v) || v < 0 || v > std::numeric_limits<int32_t>::max())
                {
                    return "sm_count must be a non-negative integer";
                }
                config.smCount = static_cast<int32_t>(v);
            }
            else if (name == kFieldWorkspace)
            {
                if (!readIntField(f, v) || v < -1)
                {
                    return "workspace_bytes must be an integer >= -1";
                }
                config.workspaceBytes = v;
            }
            else if (name == kFieldVersion)
            {
                if (!readStringField(f, s) || s != kPluginVersion)
                {
                    return "plugin_version must be \"1\", got \"" + s + "\"";
                }
            }
            else if (name == kFieldNamespace)
            {
                if (!readStringField(f, s) || (!s.empty() && s != kPluginNamespace))
                {
                    return "plugin_namespace must be \"hsiedge\", got \"" + s + "\"";
                }
            }
            // Other fields are not ours to judge (a newer exporter may add some): ignored.
        }
        if (config.nbInputs != 0)
        {
            Slots slots{};
            if (!resolveSlots(config.has, config.nbInputs, slots))
            {
                return slotsError(config.has, config.nbInputs);
            }
        }
        return std::string();
    }

    std::array<PluginField, 3> mFields{};
    PluginFieldCollection mCollection{};
};

SelectiveScanCreator& creatorInstance()
{
    static SelectiveScanCreator creator;
    return creator;
}

#ifdef HSIEDGE_TRT_REGISTER_ON_LOAD
// Register with TensorRT's global registry when the library is loaded, for loaders that only
// dlopen it (trtexec --staticPlugins, ctypes).  Such a build must not also be passed to
// IPluginRegistry::loadLibrary, which refuses creators that are already registered.
struct RegisterOnLoad
{
    RegisterOnLoad()
    {
        if (nvinfer1::IPluginRegistry* registry = getPluginRegistry())
        {
            registry->registerCreator(creatorInstance(), kPluginNamespace);
        }
    }
};
RegisterOnLoad const gRegisterOnLoad;
#endif

} // namespace

// ---------------------------------------------------------------------------------------
// Entry points looked up by IPluginRegistry::loadLibrary (and trtexec --dynamicPlugins).

extern "C" HSIEDGE_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

extern "C" HSIEDGE_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) noexcept
{
    static IPluginCreatorInterface* const creators[] = {&creatorInstance()};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
