// With ROCKSDB_LIB_DIR set (a prebuilt librocksdb.a, see the Makefile's
// `fuzz` target), librocksdb-sys does not link the C++ runtime itself.
fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    if std::env::var_os("ROCKSDB_LIB_DIR").is_some() {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}
