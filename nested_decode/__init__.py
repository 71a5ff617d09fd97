from nested_decode import platforms

platforms.leave_out_absent_tpu()  # before any JAX computation: no libtpu errors on CPU machines
