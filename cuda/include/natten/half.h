// Host-side f16 / bf16 <-> f32 conversions, written out by hand so host code needs no CUDA headers.
// Stores round to nearest, ties to even; infinities and NaNs survive (NaN payloads become quiet).
#pragma once

#include <cstdint>
#include <cstring>

namespace natten {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t{h} << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  // Adding 0x7fff plus the lowest kept bit rounds half to even; overflow carries into inf correctly.
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t{h & 0x8000u} << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in f32
    float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));  // rebias 15 -> 127
}

inline uint16_t float_to_f16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;      // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;     // >= 65520 rounds to inf (and inf itself)
  if (u >= 0x38800000u) {                          // normal f16 (>= 2^-14)
    // Rebias the exponent (127 -> 15, i.e. subtract 112 << 23) and round half to even on bit 13;
    // a mantissa carry rolls into the exponent, which is the right answer.
    u += 0xc8000fffu + ((u >> 13) & 1u);
    return sign | static_cast<uint16_t>(u >> 13);
  }
  if (u < 0x33000000u) return sign;                // < 2^-25 (ties at 2^-25 go to even: 0)
  // Subnormal f16: value = significand * 2^(e - 150) = (significand >> (126 - e)) units of 2^-24.
  uint32_t e = u >> 23;
  uint32_t significand = (u & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126 - e;                        // 14..24
  uint32_t kept = significand >> shift;
  uint32_t rest = significand & ((1u << shift) - 1);
  uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (kept & 1u))) ++kept;
  return sign | static_cast<uint16_t>(kept);
}

}  // namespace natten
