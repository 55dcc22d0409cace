// products LIB TYPE GROUPS K M COUNT PORTABLE W X CHANNELS CODES Y: one SlmopsMatMulGGML product from the library LIB,
// its arrays read from and written to raw files; prints which kernels ran.
// products LIB attention H N DIMS INTERLEAVED SCALE PORTABLE Q K V COS SIN OUT: one SlmopsAttentionRow the same way.
// tests/test_kernel_targets.py builds it for another architecture with the library and runs both under qemu-user, to
// hold that library's products against this machine's.
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <string>
#include <vector>

static std::vector<char> read(const char* path) {
  std::vector<char> data;
  if (FILE* f = fopen(path, "rb")) {
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) data.insert(data.end(), chunk, chunk + n);
    fclose(f);
  }
  return data;
}

static bool write(const char* path, const std::vector<float>& y) {
  FILE* out = fopen(path, "wb");
  const bool ok = out && fwrite(y.data(), sizeof(float), y.size(), out) == y.size();
  if (out) fclose(out);
  return ok;
}

static int attention(void* lib, char** argv) {
  using Row = void (*)(const float*, const float*, const float*, int64_t, int64_t, const float*, const float*, int64_t,
                       int, float, float*, int);
  auto row = (Row)dlsym(lib, "SlmopsAttentionRow");
  if (!row) return 1;
  const int64_t h = atoll(argv[3]), n = atoll(argv[4]), dims = atoll(argv[5]);
  const std::vector<char> q = read(argv[9]), k = read(argv[10]), v = read(argv[11]), cos = read(argv[12]),
                          sin = read(argv[13]);
  std::vector<float> out(h);
  row((const float*)q.data(), (const float*)k.data(), (const float*)v.data(), h, n, (const float*)cos.data(),
      (const float*)sin.data(), dims, atoi(argv[6]), strtof(argv[7], nullptr), out.data(), atoi(argv[8]));
  return write(argv[14], out) ? 0 : 1;
}

static int product(void* lib, char** argv) {
  using MatMul = void (*)(int64_t, const uint8_t*, int64_t, int64_t, const float*, int64_t, const int64_t*, int64_t,
                          const uint8_t*, float*, int);
  auto matmul = (MatMul)dlsym(lib, "SlmopsMatMulGGML");
  if (!matmul) return 1;
  const int64_t type = atoll(argv[2]), groups = atoll(argv[3]), k = atoll(argv[4]), m = atoll(argv[5]);
  const int64_t count = atoll(argv[6]);
  const std::vector<char> w = read(argv[8]), x = read(argv[9]), channels = read(argv[10]), codes = read(argv[11]);
  std::vector<float> y(m * groups * 8);
  matmul(type, (const uint8_t*)w.data(), groups, k, (const float*)x.data(), m, (const int64_t*)channels.data(), count,
         (const uint8_t*)codes.data(), y.data(), atoi(argv[7]));
  return write(argv[12], y) ? 0 : 1;
}

int main(int argc, char** argv) {
  const bool rows = argc == 15 && std::string(argv[2]) == "attention";
  if (argc != 13 && !rows) {
    fprintf(stderr, "usage: products LIB TYPE GROUPS K M COUNT PORTABLE W X CHANNELS CODES Y\n"
                    "       products LIB attention H N DIMS INTERLEAVED SCALE PORTABLE Q K V COS SIN OUT\n");
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) {
    fprintf(stderr, "%s\n", dlerror());
    return 1;
  }
  if (rows ? attention(lib, argv) : product(lib, argv)) return 1;
  auto code = (const char* (*)())dlsym(lib, "SlmopsKernelCode");
  printf("%s\n", code ? code() : "?");  // which kernels ran
  return 0;
}
