"""lenet_jax: explanations for any Flax model, and LeNet-5 on MNIST to train, explain and evaluate.

The package, by layer (each one uses only the ones above it):

* compute — ``cpu_kernels`` (each convolution in its fastest XLA:CPU form by shape, used by every
  explanation method; the XLA flag for wide convolutions; the forms LeNet-5 trains with).
* attribution and its evaluation — ``explain`` (LRP with zennit's and LXT's rules for any model,
  gradient methods, CAMs, occlusion: pure functions ``method(f, x, target=None, **options)``; and
  ``explain.metrics``: pixel flipping, faithfulness correlation, the randomization sanity check,
  sparseness, conservation); ``explain.prepare`` compiles a method once for a model. It stands
  alone: it imports nothing else of the package but ``cpu_kernels``.
* data and models — ``data`` (datasets, verified sources, preprocessing), ``image_files`` (your own
  pictures as dataset images), ``models`` (LeNet-5, a small ReLU CNN, MiniVGG, a ViT as Flax Linen
  modules).
* learning — ``train`` (train state, the jitted step, epochs, prediction), ``recipes`` (each model's
  training settings), ``parallel`` (data parallelism over devices), ``checkpoint``, ``experiment``
  (a whole run).
* the package's models explained — ``attribution`` (a method as a function of the parameters, with
  the options the model's dataset fills in).
* figures and reports — ``plot``, ``report`` (the explanation report behind ``scripts/explain.py``),
  ``evaluation_report`` (behind ``scripts/evaluate.py``), ``io`` (atomic writes, run-folder locks).
* serving — ``serve`` (the explorer web page behind ``scripts/serve.py``).
"""
