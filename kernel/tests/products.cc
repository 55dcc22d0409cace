// products LIB TYPE GROUPS K M COUNT PORTABLE W X CHANNELS CODES Y: one SlmopsMatMulGGML product from the library LIB,
// its arrays read from and written to raw files; prints which kernels ran. tests/test_kernel_targets.py builds it for another architecture
// with the library and runs both under qemu-user, to hold that library's products against this machine's.
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

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

int main(int argc, char** argv) {
  if (argc != 13) {
    fprintf(stderr, "usage: products LIB TYPE GROUPS K M COUNT PORTABLE W X CHANNELS CODES Y\n");
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) {
    fprintf(stderr, "%s\n", dlerror());
    return 1;
  }
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
  FILE* out = fopen(argv[12], "wb");
  if (!out || fwrite(y.data(), sizeof(float), y.size(), out) != y.size()) return 1;
  fclose(out);
  auto code = (const char* (*)())dlsym(lib, "SlmopsKernelCode");
  printf("%s\n", code ? code() : "?");  // which kernels ran
  return 0;
}
