use qwick_backend::ThreadPool;
use std::time::Instant;
fn main() {
    let pool = ThreadPool::new(2);
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..10000 {
            pool.run(&|_| {});
        }
        println!("empty run: {:.2} us", t.elapsed().as_secs_f64() * 1e6 / 10000.0);
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let t = Instant::now();
    pool.run(&|_| {});
    println!("after sleep: {:.2} us", t.elapsed().as_secs_f64() * 1e6);
}
