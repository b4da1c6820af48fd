//! With the `torch` feature, binaries, tests and benchmarks get an rpath to `$LIBTORCH/lib`, so
//! they find libtorch without `LD_LIBRARY_PATH` (see `scripts/libtorch.sh`). Nothing otherwise.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
