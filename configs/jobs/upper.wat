;; upper: copies /inputs/in.txt to /outputs/out.txt in upper case (ASCII).
;; Shoal preopens /inputs as fd 3 and /outputs as fd 4, always in that order.
;; Built by scripts/build-wasm into dist/wasm/upper.wasm; run by configs/jobs/upper.yaml.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; Layout: 0 iovec, 8 count, 12 opened fd, 64 texts, 4096..8192 copy buffer.
  (data (i32.const 64) "in.txt")
  (data (i32.const 80) "out.txt")
  (data (i32.const 96) "upper: cannot open /inputs/in.txt\n")
  (data (i32.const 144) "upper: cannot create /outputs/out.txt\n")
  (data (i32.const 192) "upper: wrote /outputs/out.txt\n")

  (func $write (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))

  (func $fail (param $ptr i32) (param $len i32)
    (drop (call $write (i32.const 2) (local.get $ptr) (local.get $len)))
    (call $proc_exit (i32.const 1)))

  (func (export "_start")
    (local $in i32)
    (local $out i32)
    (local $n i32)
    (local $i i32)
    (local $c i32)
    ;; rights: fd_read = 1<<1; fd_write = 1<<6. oflags: creat = 1, trunc = 8.
    (if (call $path_open (i32.const 3) (i32.const 1) (i32.const 64) (i32.const 6)
          (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 12))
      (then (call $fail (i32.const 96) (i32.const 34))))
    (local.set $in (i32.load (i32.const 12)))
    (if (call $path_open (i32.const 4) (i32.const 0) (i32.const 80) (i32.const 7)
          (i32.const 9) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 12))
      (then (call $fail (i32.const 144) (i32.const 38))))
    (local.set $out (i32.load (i32.const 12)))
    (block $eof
      (loop $chunk
        (i32.store (i32.const 0) (i32.const 4096))
        (i32.store (i32.const 4) (i32.const 4096))
        (br_if $eof (call $fd_read (local.get $in) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))
        (local.set $i (i32.const 0))
        (block $done
          (loop $byte
            (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
            (local.set $c (i32.load8_u (i32.add (i32.const 4096) (local.get $i))))
            (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
              (then (i32.store8 (i32.add (i32.const 4096) (local.get $i)) (i32.sub (local.get $c) (i32.const 32)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $byte)))
        (drop (call $write (local.get $out) (i32.const 4096) (local.get $n)))
        (br $chunk)))
    (drop (call $fd_close (local.get $in)))
    (drop (call $fd_close (local.get $out)))
    (drop (call $write (i32.const 1) (i32.const 192) (i32.const 30)))))
