;; hello: prints "hello from wasm", then each argument on its own line.
;; Built by scripts/build-wasm into dist/wasm/hello.wasm; run by configs/jobs/hello.yaml.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; Layout: 0 iovec, 8 nwritten, 16 argc, 20 argv buffer size, 32 text,
  ;; 1024..8192 argv pointers (up to 1792), page 1 onwards the argv strings.
  (data (i32.const 32) "hello from wasm\n")
  (data (i32.const 48) "\n")

  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $n))

  (func (export "_start")
    (local $i i32)
    (local $arg i32)
    (call $write (i32.const 32) (i32.const 16))
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (if (i32.gt_u (i32.load (i32.const 16)) (i32.const 1792)) (then (return)))
    ;; room for the strings: one page per 64 KiB, from page 1
    (if (i32.lt_s
          (memory.grow (i32.add (i32.shr_u (i32.load (i32.const 20)) (i32.const 16)) (i32.const 1)))
          (i32.const 0))
      (then (return)))
    (drop (call $args_get (i32.const 1024) (i32.const 65536)))
    (local.set $i (i32.const 1))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.load (i32.const 16))))
        (local.set $arg (i32.load (i32.add (i32.const 1024) (i32.shl (local.get $i) (i32.const 2)))))
        (call $write (local.get $arg) (call $strlen (local.get $arg)))
        (call $write (i32.const 48) (i32.const 1))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))))
